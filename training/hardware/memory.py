"""Peak GPU memory of one Z-Image training step: fixed bytes plus per-token activation bytes.

What is predicted is ``torch.cuda.max_memory_allocated()`` of one rank in steady state (optimizer states exist).
The CUDA context (~0.5 GiB, invisible to the allocator) and fragmentation are not in it; the planner subtracts the
context from the free memory and keeps a safety margin for fragmentation (see ``plan.budget_bytes``).

Activation bytes per token (the analytic table, or a probe's measurements) are in ``activations``; this module adds
the weights, gradients and optimizer states and finds the peak.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..model.config import PRESETS, ZImageConfig
from ..model.targets import DEFAULT_TARGETS, adapter_param_count, lora_param_count, target_preset
from ..vocabulary import ATTENTION_BACKENDS, BASE_STORAGES, LORA_MODES, MODES, PARALLELISMS
from .activations import BF16, FP32, ActivationCoefficients, analytic_coefficients
from .adapter_memory import adapter_terms
from .offload import SWAP_SLOTS, frozen_block_bytes, stored_linear_bytes

GIB = 1 << 30
MIB = 1 << 20

#: bitsandbytes NF4 with double quantisation: 4 bits, one 8-bit absmax per 64 weights, one fp32 per 256 absmax.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: FSDP2 keeps this many unsharded blocks in flight: current + prefetched params (bf16), one block's bf16
#: gradient and its fp32 reduce-scatter copy, expressed in bf16 block-weights.
FSDP_IN_FLIGHT_BLOCK_WEIGHTS = 2 + 1 + 2
#: Optimizer state values kept per trainable parameter, each the size of the parameter (fp32 here), after the first
#: step: AdamW exp_avg + exp_avg_sq; 8-bit AdamW the same in one byte each; Prodigy exp_avg, exp_avg_sq, s and p0
#: (p0 is one scalar for a tensor that starts at zero, LoRA B: 4 is exact for full fine-tuning and an upper bound,
#: ~15 % high, for LoRA); schedule-free AdamW z and exp_avg_sq. Adafactor (None) is factored: see
#: ``optimizer_state_values``.
OPTIMIZER_STATE_VALUES: dict[str, float | None] = {
    "adamw": 2.0,
    "adamw8bit": 0.5,
    "prodigy": 4.0,
    "schedulefree_adamw": 2.0,
    "adafactor": None,
}


def optimizer_state_values(optimizer: str, *, smallest_dim: int) -> float:
    """State values per trainable parameter. Adafactor keeps a row and a column mean of the squared gradient per
    matrix: (m + n) / (m n) <= 2 / min(m, n) values per parameter, ``smallest_dim`` being the LoRA rank, or the model
    width for a full fine-tune (its 1-D norm weights keep one value each, but are few)."""
    if optimizer not in OPTIMIZER_STATE_VALUES:
        raise ValueError(f"optimizer {optimizer!r} has no state size; known: {sorted(OPTIMIZER_STATE_VALUES)}")
    values = OPTIMIZER_STATE_VALUES[optimizer]
    return 2 / smallest_dim if values is None else values


def lora_params(model: ZImageConfig, rank: int, targets: str = DEFAULT_TARGETS) -> int:
    """Trainable LoRA parameters of a target preset (``training.model.targets``, the table the engine attaches)."""
    return lora_param_count(model, rank, targets)


def block_linear_params(model: ZImageConfig) -> int:
    """Weights of every ``nn.Linear`` inside the blocks (what QLoRA stores in NF4): the five big matmuls of all
    blocks and the adaLN modulation of the modulated ones (its bias stays bf16)."""
    modulated = model.n_layers + model.n_refiner_layers
    adaln = modulated * model.modulation_dim * 4 * model.dim
    return (model.n_layers + 2 * model.n_refiner_layers) * model.linear_params_per_block() + adaln


@dataclass(kw_only=True, frozen=True)
class MemoryEstimate:
    """A predicted peak of ``max_memory_allocated`` with where it goes (bytes) and which phase holds it."""

    peak_bytes: int
    breakdown: dict[str, int]
    phase: str

    def gib(self) -> float:
        return self.peak_bytes / GIB

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.breakdown.items() if v)
        return f"{self.peak_bytes / GIB:.2f} GiB at {self.phase} ({parts})"


@dataclass(kw_only=True, frozen=True)
class MemoryModel:
    """Analytic or probe-calibrated memory model. ``calibrated`` maps a mode to measured coefficients (taken at
    ``calibrated_rank`` for LoRA modes; other ranks are shifted by the analytic rank term). ``lora_param_bytes``:
    4 for fp32 adapters (AdamW states follow the parameter dtype), 2 for bf16."""

    model: ZImageConfig = field(default_factory=lambda: PRESETS["z-image"])
    cuda_context_bytes: int = 512 * MIB
    lora_param_bytes: int = FP32
    lora_input_fp32: bool = False  # the engine trains under bf16 autocast with peft's input cast off
    nf4_bytes_per_param: float = NF4_BYTES_PER_PARAM
    calibrated: dict[str, ActivationCoefficients] = field(default_factory=dict)
    calibrated_rank: int = 128

    def __post_init__(self) -> None:
        if self.cuda_context_bytes < 0:
            raise ValueError(f"MemoryModel.cuda_context_bytes must be >= 0, got {self.cuda_context_bytes!r}")
        if self.lora_param_bytes not in (BF16, FP32):
            raise ValueError(f"MemoryModel.lora_param_bytes must be 2 (bf16) or 4 (fp32), got {self.lora_param_bytes}")
        unknown = set(self.calibrated) - set(MODES)
        if unknown:
            raise ValueError(f"MemoryModel.calibrated has unknown modes {sorted(unknown)}; use {MODES}")

    def calibrated_from_probe(self, mode: str, coefficients: ActivationCoefficients, lora_rank: int) -> MemoryModel:
        """A copy that uses measured ``coefficients`` for ``mode`` (and for its LoRA sibling if not measured)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        calibrated = dict(self.calibrated)
        calibrated[mode] = coefficients
        sibling = {"lora": "qlora", "qlora": "lora"}.get(mode)
        if sibling and sibling not in self.calibrated:
            calibrated[sibling] = coefficients
        return dataclasses.replace(self, calibrated=calibrated, calibrated_rank=lora_rank)

    def coefficients(self, mode: str, lora_rank: int, compiled: bool = False) -> ActivationCoefficients:
        analytic = analytic_coefficients(
            self.model, mode, lora_rank, compiled, self.lora_param_bytes, self.lora_input_fp32
        )
        measured = self.calibrated.get(mode)
        if measured is None or compiled:
            return analytic
        output_bytes = FP32 if self.lora_input_fp32 else BF16
        rank_shift = 5 * output_bytes * (lora_rank - self.calibrated_rank) if mode != "full" else 0
        return dataclasses.replace(measured, block=max(0.0, measured.block + rank_shift))

    def trainable_count(
        self, mode: str, lora_rank: int, lora_targets: str, trainable_params: int | None, adapter: str = "lora"
    ) -> int:
        """Trainable parameters over all ranks: the whole model (full) or the adapters; a measured count wins."""
        if trainable_params is not None:
            return trainable_params
        if mode == "full":
            return self.model.total_params()
        return adapter_param_count(self.model, lora_rank, lora_targets, adapter)

    def fixed_bytes(
        self,
        mode: str,
        world_size: int,
        parallelism: str,
        lora_rank: int,
        *,
        lora_targets: str = DEFAULT_TARGETS,
        cpu_offload: bool = False,
        trainable_params: int | None = None,
        optimizer: str = "adamw",
        base_storage: str = "bf16",
        swap_blocks: int = 0,
        adapter: str = "lora",
        ema_on_device: bool = False,
    ) -> dict[str, int]:
        """Weights, trainable parameters, gradients and optimizer states on one rank (gradients: see ``predict_peak``;
        states: ``OPTIMIZER_STATE_VALUES``). Full fine-tuning keeps an fp32 master copy, fp32 gradients and fp32
        optimizer states, sharded under FSDP2;
        FSDP2 adds the unsharded blocks in flight; CPU offload moves the sharded state to host memory.
        Adapter modes: ``base_storage`` "fp8" stores the block linears in e4m3 (``engine.fp8_storage``);
        ``swap_blocks`` main blocks live in host memory and stream through ``SWAP_SLOTS`` device slots.
        With ``ema_on_device``, an fp32 EMA of the trainable weights (``training.engine.ema``) on the GPU, key 'ema'
        (sharded like them under FSDP2)."""
        cfg = self.model
        shards = world_size if parallelism == "fsdp2" else 1
        in_flight = FSDP_IN_FLIGHT_BLOCK_WEIGHTS * cfg.block_params(True) * BF16 if parallelism == "fsdp2" else 0
        trainable = self.trainable_count(mode, lora_rank, lora_targets, trainable_params, adapter)
        if mode == "full":
            per_param = 0 if cpu_offload else FP32
            weights, state_dim = in_flight, cfg.dim
        else:
            weights = self.base_weight_bytes(mode, base_storage)
            if swap_blocks:
                weights -= (swap_blocks - SWAP_SLOTS) * frozen_block_bytes(cfg, base_storage)
            weights = (0 if cpu_offload else weights // shards) + in_flight
            per_param, state_dim = self.lora_param_bytes, lora_rank
        fixed = {
            "weights": weights,
            "trainable": trainable * per_param // shards,
            "grads": trainable * per_param // shards,
            "optimizer": int(trainable * optimizer_state_values(optimizer, smallest_dim=state_dim) * per_param)
            // shards,
        }
        if ema_on_device:
            fixed["ema"] = trainable * FP32 // shards
        return fixed

    def base_weight_bytes(self, mode: str, base_storage: str = "bf16") -> int:
        """The frozen base in bf16, or with the block Linears in NF4 for QLoRA as ``training.engine.quantize`` does,
        or in e4m3 with a float32 scale per row (``base_storage`` "fp8", ``training.engine.fp8_storage``); norms,
        embedders and the final layer stay bf16."""
        if base_storage not in BASE_STORAGES:
            raise ValueError(f"base_storage {base_storage!r} is not one of {BASE_STORAGES}")
        total, linears = self.model.total_params(), block_linear_params(self.model)
        if mode == "qlora":
            return int((total - linears) * BF16 + linears * self.nf4_bytes_per_param)
        if base_storage == "fp8":
            return (total - linears) * BF16 + stored_linear_bytes(self.model, "fp8")
        return total * BF16

    def predict_peak(
        self,
        mode: str,
        micro_batch: int,
        image_tokens: int,
        caption_tokens: int,
        checkpoint_depth: int,
        world_size: int = 1,
        lora_rank: int = 128,
        *,
        lora_targets: str = DEFAULT_TARGETS,
        parallelism: str | None = None,
        grad_accum: int = 1,
        cpu_offload: bool = False,
        compiled: bool = False,
        attention_backend: str = "flash",
        trainable_params: int | None = None,
        optimizer: str = "adamw",
        base_storage: str = "bf16",
        swap_blocks: int = 0,
        adapter: str = "lora",
        ema_on_device: bool = False,
    ) -> MemoryEstimate:
        """Peak ``max_memory_allocated`` of one rank. Tokens are per sample and already padded to 32.

        The peak is the backward of the last non-checkpointed block (every saved activation plus that block's
        gradient work) or, with every main block checkpointed, the recompute of the last one. Gradients live
        through the whole step under DDP (bucket views) or gradient accumulation; otherwise they grow while the
        activations drain, and only the part alive at the peak is counted.
        """
        cfg = self.model
        self._validate(mode, micro_batch, image_tokens, caption_tokens, checkpoint_depth, world_size, swap_blocks)
        parallelism = _default_parallelism(mode, world_size, parallelism)
        fixed = self.fixed_bytes(
            mode,
            world_size,
            parallelism,
            lora_rank,
            lora_targets=lora_targets,
            cpu_offload=cpu_offload,
            trainable_params=trainable_params,
            optimizer=optimizer,
            base_storage=base_storage,
            swap_blocks=swap_blocks,
            adapter=adapter,
            ema_on_device=ema_on_device,
        )
        grads = fixed.pop("grads")
        coef = self.coefficients(mode, lora_rank, compiled)
        extra = self.adapter_extra(mode, adapter, lora_rank, lora_targets)
        tokens = micro_batch * (image_tokens + caption_tokens)
        quadratic = self._attention_quadratic(attention_backend, micro_batch, image_tokens)
        depth = checkpoint_depth
        phase, activations = self._peak_activations(mode, coef, extra, tokens, quadratic, depth, lora_targets)
        persistent_grads = parallelism == "ddp" or grad_accum > 1
        grads_at_peak = grads if persistent_grads else self._grads_at_peak(grads, depth, coef.checkpointed * tokens)
        breakdown = {**fixed, "grads": int(grads_at_peak), "activations": int(activations)}
        if mode == "qlora" or base_storage == "fp8":  # the dequantised bf16 weight of the widest Linear, while it runs
            breakdown["dequantized"] = 3 * cfg.dim * cfg.dim * BF16
        return MemoryEstimate(peak_bytes=sum(breakdown.values()), breakdown=breakdown, phase=phase)

    def _peak_activations(
        self,
        mode: str,
        coef: ActivationCoefficients,
        extra,
        tokens: int,
        quadratic: float,
        depth: int,
        lora_targets: str,
    ) -> tuple[str, float]:
        """(phase, bytes): the activations alive at the backward of the last non-checkpointed block or at the
        forward, whichever holds more; ``tokens`` of the whole micro-batch, ``quadratic`` the math kernel's scores."""
        cfg = self.model
        block_tokens = (coef.block + extra.per_token_block) * tokens + extra.per_block
        per_block = block_tokens + quadratic
        kept = max(cfg.n_layers - depth, 1) * per_block + depth * coef.checkpointed * tokens + coef.shared * tokens
        if mode == "full" or target_preset(lora_targets).trains_refiners:
            kept += cfg.n_refiner_layers * block_tokens  # noise refiner on image, context on caption tokens
        backward = kept + coef.backward_extra * tokens + extra.transient
        forward = kept - (per_block if depth == cfg.n_layers else 0) + coef.forward_extra * tokens + extra.transient
        return ("backward", backward) if backward >= forward else ("forward", forward)

    def adapter_extra(self, mode: str, adapter: str, lora_rank: int, lora_targets: str):
        """What DoRA, LoKr or LoHa add to LoRA's activations (``adapter_memory``); nothing for a full fine-tune."""
        output_bytes = FP32 if self.lora_input_fp32 else BF16
        return adapter_terms(
            self.model, adapter if mode in LORA_MODES else "lora", lora_rank, lora_targets, output_bytes
        )

    def _grads_at_peak(self, grads: int, depth: int, checkpoint_input_bytes: float) -> float:
        """One block's gradients at the last non-checkpointed block; with every main block checkpointed, the
        worse end of the recompute sweep (all gradients but few inputs, or all inputs but few gradients)."""
        one_block = grads / self.model.n_layers
        if depth < self.model.n_layers:
            return one_block
        return max(one_block, grads - depth * checkpoint_input_bytes)

    def _attention_quadratic(self, backend: str, micro_batch: int, image_tokens: int) -> float:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
        if backend != "math":
            return 0.0
        return float(micro_batch * self.model.n_heads * image_tokens**2 * BF16)  # the softmax output, bf16

    def _validate(self, mode, micro_batch, image_tokens, caption_tokens, depth, world_size, swap_blocks=0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if image_tokens < 1 or caption_tokens < 0:
            raise ValueError(f"token counts must be positive, got image {image_tokens}, caption {caption_tokens}")
        if not 0 <= depth <= self.model.n_layers:
            raise ValueError(f"checkpoint_depth {depth} must be in 0..{self.model.n_layers}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if swap_blocks and not SWAP_SLOTS < swap_blocks <= depth:
            raise ValueError(
                f"swap_blocks {swap_blocks} must be 0 or in {SWAP_SLOTS + 1}..checkpoint_depth {depth}: swapped blocks "
                f"are checkpointed, and {SWAP_SLOTS} or fewer would all fit in the device slots"
            )
        if swap_blocks and mode not in ("lora",):
            raise ValueError(f"swap_blocks is for mode 'lora' (bf16 or fp8 base), not {mode!r}")


def _default_parallelism(mode: str, world_size: int, parallelism: str | None) -> str:
    if parallelism is None:
        parallelism = "fsdp2" if mode == "full" and world_size > 1 else "ddp"
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism {parallelism!r} is not one of {PARALLELISMS}")
    return "none" if world_size == 1 and parallelism == "ddp" else parallelism


def padded(tokens: int, multiple: int = 32) -> int:
    return -(-tokens // multiple) * multiple


def image_tokens_for(resolution: tuple[int, int], model: ZImageConfig | None = None) -> int:
    """Padded image tokens at (width, height) px: the VAE downsamples 8x and the model patches 2x2."""
    model = model or PRESETS["z-image"]
    stride = 8 * model.patch_size
    width, height = resolution
    return padded(-(-width // stride) * -(-height // stride), model.seq_multiple)
