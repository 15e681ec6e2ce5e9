"""The ``TrainingPlan`` record: what the engine runs, each decision with its reason, checked on construction; its
JSON round trip (the node writes it into the run folder) and the decision table ``python -m training plan`` prints.
``training.hardware.plan`` makes it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..vocabulary import CAPTION_OVERFLOWS, LR_SCALINGS, OPTIMIZERS
from .memory import GIB


@dataclass(kw_only=True)
class TrainingPlan:
    """What the engine runs. ``predicted_peak_bytes`` is ``max_memory_allocated`` per GPU; ``budget_bytes`` what
    it may reach (free memory less CUDA context and safety margin). ``decisions``: (name, value, reason)."""

    mode: str
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    checkpoint_depth: int
    precision: str
    parallelism: str
    fsdp_cpu_offload: bool
    compile: bool
    attention_backend: str
    nccl_timeout_s: int
    lr: float
    lr_scaling: str
    predicted_peak_bytes: int
    budget_bytes: int
    resolution: tuple[int, int]
    caption_tokens: int
    lora_rank: int
    lora_targets: str
    lora_dtype: str
    tier: str
    memory_breakdown: dict[str, int] = field(default_factory=dict)
    decisions: list[tuple[str, object, str]] = field(default_factory=list)
    caption_overflow: str = "refuse"  # a caption longer than caption_tokens: "truncate" it or "refuse" the run
    buckets: tuple[tuple[int, int], ...] = ()  # the dataset's (width, height) shapes planned for; () when typed
    device: str = "cuda"  # "cpu" when planned for a machine without GPUs
    nodes: int = 1  # machines; world_size counts the ranks of all of them
    base_storage: str = "bf16"  # lora: "fp8" stores the frozen block linears in e4m3 (training.hardware.levers)
    swap_blocks: int = 0  # main blocks streamed from pinned host memory (block swap), always checkpointed
    swap_bytes_per_step: int = 0  # host-to-device bytes block swap copies per optimizer step (predicted)
    adapter: str = "lora"  # the adapter type priced (training.vocabulary.ADAPTER_TYPES); LoRA modes only
    optimizer: str = "adamw"  # optim.optimizer, its state priced in predicted_peak_bytes (plans before it: AdamW)
    ema: str = "off"  # ema.placement: the fp32 EMA of the trained weights "off", on the "device" (priced) or "cpu"

    def __post_init__(self) -> None:
        self.resolution = tuple(self.resolution)
        self.buckets = tuple(tuple(b) for b in self.buckets)
        if self.caption_overflow not in CAPTION_OVERFLOWS:
            raise ValueError(
                f"TrainingPlan.caption_overflow {self.caption_overflow!r} is not one of {CAPTION_OVERFLOWS}"
            )
        self.decisions = [tuple(d) for d in self.decisions]
        if self.micro_batch * self.grad_accum * self.world_size != self.global_batch:
            raise ValueError(
                f"TrainingPlan: micro_batch {self.micro_batch} x grad_accum {self.grad_accum} x world_size "
                f"{self.world_size} must equal global_batch {self.global_batch}"
            )
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"TrainingPlan.lr_scaling {self.lr_scaling!r} is not one of {LR_SCALINGS}")
        if self.nodes < 1 or self.world_size % self.nodes:
            raise ValueError(f"TrainingPlan: world_size {self.world_size} is not nodes {self.nodes} x GPUs per node")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainingPlan.optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.predicted_peak_bytes

    def table(self) -> str:
        """The decision table as printed by ``python -m training plan``."""
        rows = [(name, show_value(value, name), reason) for name, value, reason in self.decisions]
        name_width = max(len(r[0]) for r in rows)
        value_width = max(len(r[1]) for r in rows)
        where, unit = ("CPU", "process") if self.device == "cpu" else (f"{self.world_size} GPU(s)", "GPU")
        if self.nodes > 1:
            where += f" on {self.nodes} nodes"
        header = (
            f"Plan: {self.mode} on {where}, tier {self.tier}; predicted peak "
            f"{self.predicted_peak_bytes / GIB:.1f} GiB of {self.budget_bytes / GIB:.1f} GiB budget per {unit} "
            f"(headroom {self.headroom_bytes / GIB:.1f} GiB)"
        )
        lines = [header, f"{'decision':<{name_width}}  {'value':<{value_width}}  reason"]
        lines += [f"{n:<{name_width}}  {v:<{value_width}}  {r}" for n, v, r in rows]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["decisions"] = [[n, v, r] for n, v, r in self.decisions]
        data["resolution"] = list(self.resolution)
        data["buckets"] = [list(b) for b in self.buckets]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainingPlan:
        return cls(**data)


def show_value(value, name: str = "") -> str:
    """A decision's value as the table and the log print it (bytes in GiB, floats to 3 digits, shapes as WxH)."""
    if name.endswith("_bytes") and isinstance(value, int):
        return f"{value / GIB:.1f} GiB"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)
