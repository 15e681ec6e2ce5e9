"""The sections of ``<run>/config.json`` (``training.engine.config.TrainConfig`` holds one of each): typed kw_only
dataclasses, each validated on construction with errors naming ``section.key``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..model.targets import DEFAULT_TARGETS, LORA_TARGETS
from ..vocabulary import (
    ADAPTER_TYPES,
    ATTENTION_BACKENDS,
    CAPTION_OVERFLOWS,
    EMA_PLACEMENTS,
    LOSS_WEIGHTINGS,
    MODEL_VARIANT_CHOICES,
    OPTIMIZERS,
    PARALLELISMS,
    SHIFT_RULES,
    SHIFTED_SAMPLERS,
    SIGMA_SAMPLERS,
    TURBO_TRAININGS,
)
from .config_fields import bounded, require, validate

SCHEDULES = ("constant", "cosine")
#: "auto": the engine's default for the mode (DDP for LoRA/QLoRA on several ranks, FSDP2 for full fine-tuning).
PARALLEL_STRATEGIES = ("auto", *PARALLELISMS)
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)  # "auto": PyTorch picks the SDPA kernel


@dataclass(kw_only=True)
class ModelSection:
    weights: str | None = None  # .safetensors file, index.json or folder; None: random init (benchmarks, demo)
    preset: str = "z-image"  # used only for random init; a weights file brings its own shape
    dtype: str = "bf16"
    attention_backend: str = "auto"  # the SDPA kernel the plan priced (see parallelize.attention_kernels)
    variant: str = "auto"  # "base", "turbo", or "auto": from the weights file's name (training.model.variants)
    training_adapter: str = ""  # Turbo: a de-distillation LoRA merged into the frozen base before training
    turbo_training: str = "adapter"  # Turbo only: "adapter" (needs training_adapter), "dedistilled" or "raw"

    def __post_init__(self):
        validate(self, "model")
        require(self.dtype in ("bf16", "fp32"), f"model.dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        require(
            self.variant in MODEL_VARIANT_CHOICES,
            f"model.variant must be one of {MODEL_VARIANT_CHOICES}, got {self.variant!r}",
        )
        require(
            self.turbo_training in TURBO_TRAININGS,
            f"model.turbo_training must be one of {TURBO_TRAININGS}, got {self.turbo_training!r}",
        )
        require(
            self.attention_backend in ATTENTION_CHOICES,
            f"model.attention_backend must be one of {ATTENTION_CHOICES}, got {self.attention_backend!r}",
        )


@dataclass(kw_only=True)
class LoraSection:
    rank: int = bounded(16, ge=1, le=1024)
    alpha: float | None = bounded(None, gt=0)  # None: alpha = rank
    dropout: float = bounded(0.0, ge=0, lt=1)
    targets: str = DEFAULT_TARGETS
    adapter: str = "lora"  # training.vocabulary.ADAPTER_TYPES: lora, dora, lokr, loha

    def __post_init__(self):
        validate(self, "lora")
        require(self.targets in LORA_TARGETS, f"lora.targets must be one of {LORA_TARGETS}, got {self.targets!r}")
        require(self.adapter in ADAPTER_TYPES, f"lora.adapter must be one of {ADAPTER_TYPES}, got {self.adapter!r}")


@dataclass(kw_only=True)
class DataSection:
    shards: str = ""  # a shard-set folder holding manifest.json, or its URL (s3://, https://, ...); "": synthetic
    #: A remote set's local cache folder (shards kept, verified, across runs); "": each shard streamed and removed.
    shard_cache: str = ""
    synthetic: bool = False  # random cached inputs of `resolution` (benchmarks); no shards read
    resolution: int = bounded(512, ge=16, le=8192)  # synthetic only
    caption_tokens: int = bounded(128, ge=1, le=8192)  # synthetic only
    num_workers: int = bounded(2, ge=0, le=256)
    shuffle_buffer: int = bounded(1000, ge=1, le=10_000_000)  # 1: no shuffling within shards
    caption_dropout: float = bounded(0.1, ge=0, le=1)  # probability of training on the empty caption (for CFG)
    max_caption_tokens: int = bounded(0, ge=0, le=65_536)  # the caption length the plan counted memory for; 0: no limit
    caption_overflow: str = "refuse"  # a longer caption: "truncate" it (counted in the log) or "refuse" the run

    def __post_init__(self):
        validate(self, "data")
        require(bool(self.shards) or self.synthetic, "data.shards is empty: give a shard-set folder (pack one first)")
        require(
            self.resolution % 16 == 0, f"data.resolution: must be a positive multiple of 16, got {self.resolution!r}"
        )
        require(
            self.caption_overflow in CAPTION_OVERFLOWS,
            f"data.caption_overflow must be one of {CAPTION_OVERFLOWS}, got {self.caption_overflow!r}",
        )


@dataclass(kw_only=True)
class OptimSection:
    """``optimizer``: one of ``training.vocabulary.OPTIMIZERS``; AdamW is the default of every mode (lora, qlora, full),
    the optimizer the planner's measurements and the tier settings were made with."""

    optimizer: str = "adamw"
    lr: float = bounded(1e-4, gt=0, le=1)  # the base rate (Prodigy: a multiplier, usually 1); scaled with world size
    weight_decay: float = bounded(0.01, ge=0)
    betas: tuple[float, float] = bounded((0.9, 0.999), ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0, lt=1)
    warmup_steps: int = bounded(0, ge=0, le=10_000_000)
    schedule: str = "constant"
    grad_clip: float = bounded(1.0, ge=0)  # 0 disables clipping

    def __post_init__(self):
        validate(self, "optim")
        require(self.optimizer in OPTIMIZERS, f"optim.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        require(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        require(
            self.optimizer != "schedulefree_adamw" or self.schedule == "constant",
            f"optim.schedule {self.schedule!r} with optim.optimizer 'schedulefree_adamw': schedule-free AdamW replaces "
            "the LR schedule (its average is the annealing); set optim.schedule to 'constant' (warmup_steps is kept)",
        )


@dataclass(kw_only=True)
class EmaSection:
    """EMA of the trained weights (``training.engine.ema``), saved beside the result as ``<name>_ema.safetensors``.
    ``placement`` (the plan decides it: the shadow is priced) "off", "device" or "cpu"; ``start_step``: until this
    optimizer step the EMA equals the weights."""

    placement: str = "off"
    decay: float = bounded(0.999, gt=0, lt=1)
    start_step: int = bounded(0, ge=0, le=10_000_000)

    def __post_init__(self):
        validate(self, "ema")
        require(
            self.placement in EMA_PLACEMENTS,
            f"ema.placement must be one of {EMA_PLACEMENTS}, got {self.placement!r}",
        )


@dataclass(kw_only=True)
class ObjectiveSection:
    """σ sampling and loss weighting (``training.engine.objective``; docs/training.md justifies the defaults)."""

    sigma_sampler: str = "shifted_uniform"
    shift: float = bounded(3.0, gt=0)  # ComfyUI's ZImage sampling shift; with shift_rule "sd3": the shift at 1024²
    shift_rule: str = "fixed"  # the shifted samplers' shift: "fixed", or from the image's token count
    logit_mean: float = 0.0
    logit_std: float = bounded(1.0, gt=0)
    mode_scale: float = bounded(1.29, ge=-1.0, le=1.75)  # "mode" only (SD3's s; above ~1.75 it is not monotone)
    loss_weighting: str = "none"

    def __post_init__(self):
        validate(self, "objective")
        require(
            self.sigma_sampler in SIGMA_SAMPLERS,
            f"objective.sigma_sampler must be one of {SIGMA_SAMPLERS}, got {self.sigma_sampler!r}",
        )
        require(
            self.shift_rule in SHIFT_RULES,
            f"objective.shift_rule must be one of {SHIFT_RULES}, got {self.shift_rule!r}",
        )
        require(
            self.shift_rule == "fixed" or self.sigma_sampler in SHIFTED_SAMPLERS,
            f"objective.shift_rule {self.shift_rule!r} shifts only {SHIFTED_SAMPLERS}; sigma_sampler "
            f"{self.sigma_sampler!r} has no shift: set shift_rule to 'fixed' or pick a shifted sampler",
        )
        require(
            self.loss_weighting in LOSS_WEIGHTINGS,
            f"objective.loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}",
        )


@dataclass(kw_only=True)
class PreviewSection:
    """Preview images while training (`training.engine.preview`): ComfyUI's KSampler settings (euler, simple)."""

    features: str = ""  # the encoded prompts (`preview.save_prompt_features`); "": no previews
    every: int = bounded(0, ge=0, le=10_000_000)  # steps between previews; 0: at the end only
    at_start: bool = True  # also before the first step (the base model, for comparison); not again on a resume
    seed: int = bounded(0, ge=0, le=2**64 - 1)
    # None: the model variant's (training.model.variants: preview_steps, cfg, sampling_shift)
    steps: int | None = bounded(None, ge=1, le=1000)
    cfg: float | None = bounded(None, gt=0, le=100)  # ComfyUI's cfg: 1 is no guidance (then no negative prompt runs)
    shift: float | None = bounded(None, gt=0, le=100)  # ComfyUI's Z-Image sampling shift (ModelSamplingAuraFlow)
    width: int = bounded(512, ge=16, le=4096)
    height: int = bounded(512, ge=16, le=4096)

    def __post_init__(self):
        validate(self, "preview")
        for name in ("width", "height"):
            value = getattr(self, name)
            require(value % 16 == 0, f"preview.{name}: must be a multiple of 16 (VAE 8 x patch 2), got {value!r}")


@dataclass(kw_only=True)
class RunSection:
    output_dir: str  # the run folder: events, status, checkpoints
    lora_path: str = ""  # where the ComfyUI-ready LoRA goes; "" → <output_dir>/lora.safetensors
    model_path: str = ""  # mode 'full': where the fine-tuned transformer goes; "" → <output_dir>/model.safetensors
    steps: int = bounded(100, ge=1, le=10_000_000)
    micro_batch: int = bounded(1, ge=1, le=4096)
    grad_accum: int = bounded(1, ge=1, le=4096)
    checkpoint_depth: int = bounded(0, ge=0, le=1024)  # main blocks with activation checkpointing, from the first
    compile: bool = False
    fp8: bool = False
    fp8_base: bool = False  # LoRA: store the frozen block linears in e4m3 (1 byte/weight), upcast per layer
    swap_blocks: int = bounded(0, ge=0, le=1024)  # LoRA: first main blocks kept in pinned host memory, streamed in
    save_every: int | None = bounded(None, ge=0, le=10_000_000)  # 0: only at the end; None: see save_interval
    save_state: bool = True  # false: no resumable checkpoint (benchmarks, smoke runs); the LoRA file is still written
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    profile_steps: tuple[int, ...] = bounded((), ge=0)
    nccl_timeout_s: int = bounded(1800, ge=1)
    fsdp_cpu_offload: bool = False
    ddp_bf16_grads: bool = False  # LoRA/QLoRA on several GPUs: all-reduce gradients in bf16 (half the bytes)

    def __post_init__(self):
        validate(self, "run")
        require(bool(self.output_dir), "run.output_dir is empty: give the run folder")

    def save_interval(self) -> tuple[int, str]:
        """(steps between saves, 0: only at the end; the reason). Unset: every 10% of the run, 50..1000 steps apart,
        so a crash loses at most a tenth of the run (and at most 1000 steps) for about ten saves; runs of 50 steps or
        fewer (cheap to redo) save only at the end."""
        if self.save_every is not None:
            return self.save_every, f"run.save_every = {self.save_every}"
        interval = min(max(-(-self.steps // 10), 50), 1000)
        if interval >= self.steps:
            return 0, f"run.save_every unset; {self.steps} steps are cheap to redo"
        return interval, "run.save_every unset: every 10% of the steps, 50..1000 steps apart"

    @property
    def lora_file(self) -> Path:
        return Path(self.lora_path) if self.lora_path else Path(self.output_dir) / "lora.safetensors"

    @property
    def model_file(self) -> Path:
        """Full fine-tuning's result: one ComfyUI diffusion-model file (``load_diffusion_model`` / UNETLoader)."""
        return Path(self.model_path) if self.model_path else Path(self.output_dir) / "model.safetensors"


@dataclass(kw_only=True)
class ParallelSection:
    """How the ranks share the work; ``parallelize`` does exactly this (the plan writes it)."""

    strategy: str = "auto"

    def __post_init__(self):
        require(
            self.strategy in PARALLEL_STRATEGIES,
            f"parallel.strategy must be one of {PARALLEL_STRATEGIES}, got {self.strategy!r}",
        )
