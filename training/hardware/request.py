"""What the user asks the planner for, validated, and the refusal raised when nothing fits."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.stats import DatasetStats
from ..model.config import PRESETS, ZImageConfig
from ..model.targets import DEFAULT_TARGETS, LORA_TARGETS, qlora_unsupported
from ..vocabulary import (
    ADAPTER_TYPES,
    ATTENTION_BACKENDS,
    BASE_STORAGES,
    DEFAULT_OPTIMIZER,
    FULL_MODE_OPTIMIZERS,
    LR_SCALINGS,
    MODES,
    OPTIMIZERS,
)
from .memory import GIB

PIXELS_PER_TOKEN_SIDE = 16  # VAE 8x, patch 2x
EMA_REQUESTS = ("off", "auto", "device", "cpu")


@dataclass(kw_only=True)
class PlanRequest:
    """A training job to plan. ``resolution``: square side in px or (width, height), multiples of 16.
    None means "the tier's default" for ``target_global_batch``, ``compile``, ``attention_backend`` and
    ``safety_margin``; ``world_size`` is the GPUs per node (None: every GPU found), ``nodes`` the machines (None: the
    tier's, else 1), so the job has ``world_size x nodes`` ranks; ``micro_batch`` / ``checkpoint_depth`` force a value
    (the plan refuses if it does not fit). ``trainable_params``: a measured count overriding the analytic one."""

    mode: str
    resolution: int | tuple[int, int]
    caption_tokens: int = 128
    lora_rank: int = 128
    lora_targets: str = DEFAULT_TARGETS
    target_global_batch: int | None = None
    lr_base: float = 1e-4
    lr_scaling: str = "sqrt"
    model: ZImageConfig = field(default_factory=lambda: PRESETS["z-image"])
    compile: bool | None = None
    attention_backend: str | None = None
    world_size: int | None = None
    micro_batch: int | None = None
    checkpoint_depth: int | None = None
    fsdp_cpu_offload: bool = False
    safety_margin: float | None = None
    trainable_params: int | None = None
    dataset: DatasetStats | None = None  # the shard set: its largest bucket and caption lengths replace the typed ones
    caption_percentile: float | None = None  # None: plan for the longest caption; 99: for p99, truncating longer ones
    #: the run's optim.optimizer, its state priced (memory.OPTIMIZER_STATE_VALUES); None: the mode's default
    #: (``vocabulary.DEFAULT_OPTIMIZER``), set here so that every estimate prices the optimizer the plan writes
    optimizer: str | None = None
    nodes: int | None = None  # machines of the job, each with ``world_size`` GPUs; None: the tier's (1 unless it says)
    inter_node_gbps: float | None = None  # GB/s per node's network interface; None: the tier's or network's default
    base_storage: str | None = None  # mode lora: force "bf16" or "fp8" storage of the frozen base (None: planned)
    swap_blocks: int | None = None  # mode lora: force the number of main blocks swapped from host memory
    adapter: str = "lora"  # the run's lora.adapter (LoRA modes): priced by memory.adapter_extra and adapter_memory
    #: an fp32 EMA of the trained weights: "off", on the GPU ("device"), in host RAM ("cpu"), or "auto" (the GPU
    #: when the plan fits with it there, else host RAM: the plan decides and says why)
    ema: str = "off"

    def __post_init__(self) -> None:
        self._check_job()
        self._check_recipe()
        self._check_memory_levers()

    def _check_job(self) -> None:
        """The mode, the image size, the counts and the network."""
        if self.mode not in MODES:
            raise ValueError(f"PlanRequest.mode {self.mode!r} is not one of {MODES}")
        if isinstance(self.resolution, list):
            self.resolution = tuple(self.resolution)
        for side in self.width_height:
            if not isinstance(side, int) or side <= 0 or side % PIXELS_PER_TOKEN_SIDE:
                raise ValueError(
                    f"PlanRequest.resolution {self.resolution!r}: each side must be a positive multiple of "
                    f"{PIXELS_PER_TOKEN_SIDE} px (e.g. 512 or (768, 512))"
                )
        self._check_positive("caption_tokens", "lora_rank")
        self._check_positive_or_none("target_global_batch", "world_size", "micro_batch", "trainable_params", "nodes")
        if self.inter_node_gbps is not None and (
            isinstance(self.inter_node_gbps, bool) or not self.inter_node_gbps > 0
        ):
            raise ValueError(f"PlanRequest.inter_node_gbps must be > 0 GB/s (e.g. 12.5), got {self.inter_node_gbps!r}")

    def _check_recipe(self) -> None:
        """What trains and how: adapter, targets, learning rate, optimizer, EMA, attention kernel."""
        if self.lora_targets not in LORA_TARGETS:
            raise ValueError(f"PlanRequest.lora_targets {self.lora_targets!r} is not one of {LORA_TARGETS}")
        if not self.lr_base > 0:
            raise ValueError(f"PlanRequest.lr_base must be > 0 (e.g. 1e-4), got {self.lr_base!r}")
        if self.adapter not in ADAPTER_TYPES:
            raise ValueError(f"PlanRequest.adapter {self.adapter!r} is not one of {ADAPTER_TYPES}")
        if self.mode == "qlora" and qlora_unsupported(self.adapter):
            raise ValueError(f"PlanRequest.adapter: {qlora_unsupported(self.adapter)}")
        self._check_optimizer()
        if self.ema not in EMA_REQUESTS:
            raise ValueError(f"PlanRequest.ema {self.ema!r} is not one of {EMA_REQUESTS}")
        if self.ema == "device" and self.fsdp_cpu_offload:
            raise ValueError(
                "PlanRequest.ema 'device' with fsdp_cpu_offload: the offloaded weights live in host RAM, so does "
                "their EMA; use ema 'cpu' or 'auto'"
            )
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"PlanRequest.lr_scaling {self.lr_scaling!r} is not one of {LR_SCALINGS}")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"PlanRequest.attention_backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS}"
            )

    def _check_memory_levers(self) -> None:
        """What trades speed or precision for memory: checkpoint depth, offload, caption length, base storage,
        block swap and the safety margin."""
        if self.checkpoint_depth is not None and not 0 <= self.checkpoint_depth <= self.model.n_layers:
            raise ValueError(
                f"PlanRequest.checkpoint_depth {self.checkpoint_depth!r} must be in 0..{self.model.n_layers}"
            )
        if self.fsdp_cpu_offload and self.mode != "full":
            raise ValueError(
                f"PlanRequest.fsdp_cpu_offload is for mode 'full' (the engine shards only full fine-tuning); "
                f"mode {self.mode!r} cannot offload: use qlora or a lower resolution"
            )
        if self.caption_percentile is not None and (
            isinstance(self.caption_percentile, bool) or not 50 <= self.caption_percentile <= 100
        ):
            raise ValueError(
                f"PlanRequest.caption_percentile {self.caption_percentile!r} must be in [50, 100] (e.g. 99) or None"
            )
        if self.base_storage is not None and self.base_storage not in BASE_STORAGES:
            raise ValueError(f"PlanRequest.base_storage {self.base_storage!r} is not one of {BASE_STORAGES} or None")
        if (self.base_storage is not None or self.swap_blocks) and self.mode != "lora":
            raise ValueError(
                f"PlanRequest.base_storage / swap_blocks are levers of mode 'lora'; mode {self.mode!r} has its own base"
            )
        if self.swap_blocks is not None and (
            isinstance(self.swap_blocks, bool) or not isinstance(self.swap_blocks, int) or self.swap_blocks < 0
        ):
            raise ValueError(f"PlanRequest.swap_blocks must be an integer >= 0 or None, got {self.swap_blocks!r}")
        if self.safety_margin is not None and not 0 <= self.safety_margin < 0.5:
            raise ValueError(f"PlanRequest.safety_margin {self.safety_margin!r} must be in [0, 0.5), e.g. 0.08")

    def _check_optimizer(self) -> None:
        if self.optimizer is None:
            self.optimizer = DEFAULT_OPTIMIZER[self.mode]
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"PlanRequest.optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.mode == "full" and self.optimizer not in FULL_MODE_OPTIMIZERS:
            raise ValueError(
                f"PlanRequest.optimizer {self.optimizer!r} cannot train mode 'full': full fine-tuning runs under "
                f"FSDP2 (also on one GPU), where only {FULL_MODE_OPTIMIZERS} step the sharded parameters; choose "
                f"{FULL_MODE_OPTIMIZERS[0]!r}, or a LoRA mode for {self.optimizer!r}"
            )

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PlanRequest.{name} must be a positive integer, got {value!r}")

    def _check_positive_or_none(self, *names: str) -> None:
        self._check_positive(*(name for name in names if getattr(self, name) is not None))

    @property
    def width_height(self) -> tuple[int, int]:
        if isinstance(self.resolution, tuple):
            if len(self.resolution) != 2:
                raise ValueError(f"PlanRequest.resolution {self.resolution!r} must be one side or (width, height)")
            return self.resolution
        return (self.resolution, self.resolution)

    @property
    def caption_overflow(self) -> str:
        """What the engine does with a caption longer than planned: truncate when a percentile was chosen."""
        return "refuse" if self.caption_percentile is None else "truncate"

    def target_micro_batch(self, world_size: int) -> int | None:
        """Samples each rank must contribute per optimizer step, or None when the target is not set yet."""
        if self.target_global_batch is None:
            return None
        return -(-self.target_global_batch // world_size)

    def describe(self) -> str:
        width, height = self.width_height
        rank = f" r{self.lora_rank}" if self.mode != "full" else ""
        return f"{self.mode}{rank} at {width}x{height}px, caption {self.caption_tokens} tokens"


class PlanRefused(ValueError):
    """Nothing fits. ``alternatives`` lists configurations that would, each with its predicted peak."""

    def __init__(self, request: PlanRequest, reason: str, alternatives: list, budget_bytes: int):
        self.request = request
        self.reason = reason
        self.alternatives = list(alternatives)
        self.budget_bytes = budget_bytes
        lines = [f"cannot plan {request.describe()}: {reason} (budget {budget_bytes / GIB:.1f} GiB per GPU)."]
        if self.alternatives:
            lines.append("These would fit:")
            lines += [f"  - {alternative.line()}" for alternative in self.alternatives]
        else:
            lines.append("No alternative fits this machine; use a GPU with more memory.")
        super().__init__("\n".join(lines))
