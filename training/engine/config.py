"""The one validated config file a training run reads (``<run>/config.json``).

Typed kw_only dataclasses; unknown keys are errors naming the section and the allowed keys, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..model.targets import DEFAULT_TARGETS, LORA_TARGETS
from ..vocabulary import ATTENTION_BACKENDS, CAPTION_OVERFLOWS, LORA_MODES, MODES, PARALLELISMS

SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")
SIGMA_SAMPLERS = ("shifted_uniform", "logit_normal", "uniform")
#: "auto": the engine's default for the mode (DDP for LoRA/QLoRA on several ranks, FSDP2 for full fine-tuning).
PARALLEL_STRATEGIES = ("auto", *PARALLELISMS)
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)  # "auto": PyTorch picks the SDPA kernel


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(kw_only=True)
class ModelSection:
    weights: str | None = None  # .safetensors file, index.json or folder; None: random init (benchmarks, demo)
    preset: str = "z-image"  # used only for random init; a weights file brings its own shape
    dtype: str = "bf16"
    attention_backend: str = "auto"  # the SDPA kernel the plan priced (see parallelize.attention_kernels)

    def __post_init__(self):
        _require(self.dtype in ("bf16", "fp32"), f"model.dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        _require(
            self.attention_backend in ATTENTION_CHOICES,
            f"model.attention_backend must be one of {ATTENTION_CHOICES}, got {self.attention_backend!r}",
        )


@dataclass(kw_only=True)
class LoraSection:
    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self):
        _require(1 <= self.rank <= 1024, f"lora.rank must be in 1..1024, got {self.rank!r}")
        _require(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        _require(self.targets in LORA_TARGETS, f"lora.targets must be one of {LORA_TARGETS}, got {self.targets!r}")


@dataclass(kw_only=True)
class DataSection:
    shards: str = ""  # a shard-set folder holding manifest.json; "" only with synthetic=True
    synthetic: bool = False  # random cached inputs of `resolution` (benchmarks); no shards read
    resolution: int = 512  # synthetic only
    caption_tokens: int = 128  # synthetic only
    num_workers: int = 2
    shuffle_buffer: int = 1000
    caption_dropout: float = 0.1  # probability of training on the empty caption (for CFG)
    max_caption_tokens: int = 0  # the caption length the plan counted memory for; 0: no limit
    caption_overflow: str = "refuse"  # a longer caption: "truncate" it (counted in the log) or "refuse" the run

    def __post_init__(self):
        _require(bool(self.shards) or self.synthetic, "data.shards is empty: give a shard-set folder (pack one first)")
        _require(
            0.0 <= self.caption_dropout <= 1.0, f"data.caption_dropout must be in [0, 1], got {self.caption_dropout!r}"
        )
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers!r}")
        _require(
            self.max_caption_tokens >= 0,
            f"data.max_caption_tokens must be >= 0 (0: no limit), got {self.max_caption_tokens!r}",
        )
        _require(
            self.caption_overflow in CAPTION_OVERFLOWS,
            f"data.caption_overflow must be one of {CAPTION_OVERFLOWS}, got {self.caption_overflow!r}",
        )
        _require(
            self.resolution % 16 == 0 and self.resolution > 0,
            f"data.resolution must be a positive multiple of 16, got {self.resolution!r}",
        )


@dataclass(kw_only=True)
class OptimSection:
    optimizer: str = "adamw"
    lr: float = 1e-4  # the base rate; the plan scales it with world size
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _require(self.optimizer in OPTIMIZERS, f"optim.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(0 < self.lr < 1, f"optim.lr must be in (0, 1), got {self.lr!r}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        _require(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip!r}")


@dataclass(kw_only=True)
class ObjectiveSection:
    sigma_sampler: str = "shifted_uniform"
    shift: float = 3.0  # ComfyUI's ZImage sampling shift
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        _require(
            self.sigma_sampler in SIGMA_SAMPLERS,
            f"objective.sigma_sampler must be one of {SIGMA_SAMPLERS}, got {self.sigma_sampler!r}",
        )
        _require(self.shift > 0, f"objective.shift must be > 0, got {self.shift!r}")
        _require(self.logit_std > 0, f"objective.logit_std must be > 0, got {self.logit_std!r}")


@dataclass(kw_only=True)
class RunSection:
    output_dir: str  # the run folder: events, status, checkpoints
    lora_path: str = ""  # where the ComfyUI-ready LoRA goes; "" → <output_dir>/lora.safetensors
    steps: int = 100
    micro_batch: int = 1
    grad_accum: int = 1
    checkpoint_depth: int = 0  # main blocks with activation checkpointing, counted from the first
    compile: bool = False
    fp8: bool = False
    save_every: int = 0  # 0: only at the end
    save_state: bool = True  # false: no resumable checkpoint (benchmarks, smoke runs); the LoRA file is still written
    seed: int = 0
    resume: bool = True  # continue from the newest complete checkpoint in output_dir
    profile_steps: tuple[int, ...] = ()
    nccl_timeout_s: int = 1800
    fsdp_cpu_offload: bool = False
    ddp_bf16_grads: bool = False  # LoRA/QLoRA on several GPUs: all-reduce gradients in bf16 (half the bytes)

    def __post_init__(self):
        self.profile_steps = tuple(self.profile_steps)
        _require(bool(self.output_dir), "run.output_dir is empty: give the run folder")
        _require(1 <= self.steps <= 10_000_000, f"run.steps must be in 1..10,000,000, got {self.steps!r}")
        _require(1 <= self.micro_batch <= 4096, f"run.micro_batch must be in 1..4096, got {self.micro_batch!r}")
        _require(1 <= self.grad_accum <= 4096, f"run.grad_accum must be in 1..4096, got {self.grad_accum!r}")
        _require(self.checkpoint_depth >= 0, f"run.checkpoint_depth must be >= 0, got {self.checkpoint_depth!r}")
        _require(self.save_every >= 0, f"run.save_every must be >= 0, got {self.save_every!r}")
        _require(self.nccl_timeout_s > 0, f"run.nccl_timeout_s must be > 0, got {self.nccl_timeout_s!r}")

    @property
    def lora_file(self) -> Path:
        return Path(self.lora_path) if self.lora_path else Path(self.output_dir) / "lora.safetensors"


@dataclass(kw_only=True)
class ParallelSection:
    """How the ranks share the work; ``parallelize`` does exactly this (the plan writes it)."""

    strategy: str = "auto"

    def __post_init__(self):
        _require(
            self.strategy in PARALLEL_STRATEGIES,
            f"parallel.strategy must be one of {PARALLEL_STRATEGIES}, got {self.strategy!r}",
        )


@dataclass(kw_only=True)
class TrainConfig:
    mode: str = "lora"
    run: RunSection
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=lambda: DataSection(synthetic=True))
    optim: OptimSection = field(default_factory=OptimSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    plan: dict[str, Any] | None = None  # the TrainingPlan that chose micro-batch, depth, ...: kept for the record

    def __post_init__(self):
        _require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _require(
            not (self.run.fp8 and self.mode == "qlora"),
            "run.fp8 cannot be combined with mode 'qlora' (the base is already 4-bit): turn one off",
        )
        _check_parallel(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _build(cls, data, "config")

    @classmethod
    def from_plan(cls, plan, **sections: dict[str, Any]) -> TrainConfig:
        """The config a ``TrainingPlan`` runs as: what the plan decided (``PLAN_DECIDES``) comes from it, the caller
        gives the rest per section (``run={"output_dir": ..., "steps": ...}, data={"shards": ...}``). Giving a key
        the plan decides is an error naming it: the plan is the contract, not a default."""
        decided = plan_values(plan)
        for section, given in sections.items():
            if section not in PLAN_DECIDES and section not in ("objective",):
                raise ValueError(f"TrainConfig.from_plan: unknown section {section!r}; use {sorted(PLAN_DECIDES)}")
            clash = sorted(set(given) & set(PLAN_DECIDES.get(section, ())))
            if clash:
                keys = ", ".join(f"{section}.{key}" for key in clash)
                raise ValueError(f"{keys} is decided by the plan; change the plan (or edit config.json), not both")
        merged = {name: {**sections.get(name, {}), **values} for name, values in decided.items()}
        merged.update({name: given for name, given in sections.items() if name not in merged})
        return cls.from_dict({"mode": plan.mode, **merged, "plan": plan.to_dict()})

    def save(self, path: str | os.PathLike) -> None:
        write_json_atomic(path, self.to_dict(), sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config file {path}: {error}") from None


#: The config keys a plan decides, per section (``plan_values`` fills them).
PLAN_DECIDES: dict[str, tuple[str, ...]] = {
    "run": ("micro_batch", "grad_accum", "checkpoint_depth", "compile", "nccl_timeout_s", "fsdp_cpu_offload"),
    "model": ("dtype", "attention_backend"),
    "lora": ("rank", "targets"),
    "data": ("max_caption_tokens", "caption_overflow"),
    "optim": ("lr",),
    "parallel": ("strategy",),
}


def plan_values(plan) -> dict[str, dict[str, Any]]:
    """The plan's decisions as config values (the plan is duck-typed: the engine does not import the planner)."""
    values = {
        "run": {
            "micro_batch": plan.micro_batch,
            "grad_accum": plan.grad_accum,
            "checkpoint_depth": plan.checkpoint_depth,
            "compile": plan.compile,
            "nccl_timeout_s": plan.nccl_timeout_s,
            "fsdp_cpu_offload": plan.fsdp_cpu_offload,
        },
        "model": {"dtype": plan.precision, "attention_backend": plan.attention_backend},
        "lora": {"rank": plan.lora_rank, "targets": plan.lora_targets} if plan.mode in LORA_MODES else {},
        "data": {"max_caption_tokens": plan.caption_tokens, "caption_overflow": plan.caption_overflow},
        "optim": {"lr": plan.lr},
        "parallel": {"strategy": plan.parallelism},
    }
    return values


def _check_parallel(config: TrainConfig) -> None:
    """What the engine runs: FSDP2 (and its CPU offload) for full fine-tuning, DDP for LoRA/QLoRA."""
    strategy = config.parallel.strategy
    _require(
        not (strategy == "fsdp2" and config.mode in LORA_MODES),
        f"parallel.strategy 'fsdp2' is for mode 'full'; mode {config.mode!r} replicates with 'ddp' (or use 'auto')",
    )
    _require(
        not (strategy == "ddp" and config.mode == "full"),
        "parallel.strategy 'ddp' cannot train mode 'full' (it would replicate fp32 AdamW states): use 'fsdp2'",
    )
    _require(
        not (config.run.fsdp_cpu_offload and config.mode in LORA_MODES),
        f"run.fsdp_cpu_offload is for mode 'full' (FSDP2); mode {config.mode!r} does not shard: set it to false",
    )


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        section = _dataclass_type(hints[name])
        values[name] = _build(section, value, f"{where}.{name}") if section and value is not None else value
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing key(s) {missing} in {where}")
    return cls(**values)


def _dataclass_type(hint) -> type | None:
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)
