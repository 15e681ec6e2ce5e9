"""The one validated config file a training run reads (``<run>/config.json``).

Typed kw_only dataclasses; unknown keys are errors naming the section and the allowed keys, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..model.targets import DEFAULT_TARGETS, LORA_TARGETS, qlora_unsupported
from ..vocabulary import (
    ADAPTER_TYPES,
    ATTENTION_BACKENDS,
    CAPTION_OVERFLOWS,
    EMA_PLACEMENTS,
    LORA_MODES,
    LOSS_WEIGHTINGS,
    MODEL_VARIANT_CHOICES,
    MODES,
    OPTIMIZERS,
    PARALLELISMS,
    SHIFT_RULES,
    SHIFTED_SAMPLERS,
    SIGMA_SAMPLERS,
    TURBO_TRAININGS,
)
from .resolution_schedule import ResolutionSection
from .variant_setup import check_variant_config

SCHEDULES = ("constant", "cosine")
#: "auto": the engine's default for the mode (DDP for LoRA/QLoRA on several ranks, FSDP2 for full fine-tuning).
PARALLEL_STRATEGIES = ("auto", *PARALLELISMS)
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)  # "auto": PyTorch picks the SDPA kernel


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class Bounds:
    """The range a number field (or each element of a tuple field) must lie in; None: unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            if isinstance(self.low, int) and isinstance(self.high, int) and not (self.low_open or self.high_open):
                return f" in {self.low}..{self.high:,}"
            return f" in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low}"
        return f" {'<' if self.high_open else '<='} {self.high}" if self.high is not None else ""


def bounded(default, *, ge=None, gt=None, le=None, lt=None):
    """A dataclass field whose value `_validate` checks against these bounds (ge/gt below, le/lt above)."""
    bounds = Bounds(
        low=gt if gt is not None else ge,
        high=lt if lt is not None else le,
        low_open=gt is not None,
        high_open=lt is not None,
    )
    return field(default=default, metadata={"bounds": bounds})


def _validate(section, where: str) -> None:
    """Check every field against its annotation and bounds; ints become floats where a float is expected.

    bool is not an int here (JSON ``true`` is no step count), and every float must be finite."""
    hints = typing.get_type_hints(type(section))
    for spec in dataclasses.fields(section):
        key = f"{where}.{spec.name}" if where else spec.name
        value = _typed(getattr(section, spec.name), hints[spec.name], key, spec.metadata.get("bounds"))
        setattr(section, spec.name, value)


def _typed(value, hint, key: str, bounds: Bounds | None):
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _typed(value, hint, key, bounds)
    origin = typing.get_origin(hint)
    if origin is tuple:
        many = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(value, (list, tuple)) or (not many and len(value) != len(args)):
            raise ValueError(f"{key}: must be a list of {'' if many else f'{len(args)} '}values, got {value!r}")
        kinds = [args[0]] * len(value) if many else list(args)
        return tuple(_typed(item, kind, f"{key}[{i}]", bounds) for i, (kind, item) in enumerate(zip(kinds, value)))
    if origin is dict or dataclasses.is_dataclass(hint):
        _require(isinstance(value, origin or hint), f"{key}: must be an object, got {value!r}")
        return value
    if hint is bool:
        _require(isinstance(value, bool), f"{key}: must be true or false, got {value!r}")
    elif hint is str:
        _require(isinstance(value, str), f"{key}: must be a string, got {value!r}")
    elif hint is int:
        expected = f"an integer{bounds.describe() if bounds else ''}"
        _require(isinstance(value, int) and not isinstance(value, bool), f"{key}: must be {expected}, got {value!r}")
    elif hint is float:
        expected = f"a finite number{bounds.describe() if bounds else ''}"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        _require(number and math.isfinite(value), f"{key}: must be {expected}, got {value!r}")
    if bounds is not None and hint in (int, float):
        kind = "an integer" if hint is int else "a finite number"
        _require(bounds.contains(value), f"{key}: must be {kind}{bounds.describe()}, got {value!r}")
    return float(value) if hint is float else value


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
        _validate(self, "model")
        _require(self.dtype in ("bf16", "fp32"), f"model.dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        _require(
            self.variant in MODEL_VARIANT_CHOICES,
            f"model.variant must be one of {MODEL_VARIANT_CHOICES}, got {self.variant!r}",
        )
        _require(
            self.turbo_training in TURBO_TRAININGS,
            f"model.turbo_training must be one of {TURBO_TRAININGS}, got {self.turbo_training!r}",
        )
        _require(
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
        _validate(self, "lora")
        _require(self.targets in LORA_TARGETS, f"lora.targets must be one of {LORA_TARGETS}, got {self.targets!r}")
        _require(self.adapter in ADAPTER_TYPES, f"lora.adapter must be one of {ADAPTER_TYPES}, got {self.adapter!r}")


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
        _validate(self, "data")
        _require(bool(self.shards) or self.synthetic, "data.shards is empty: give a shard-set folder (pack one first)")
        _require(
            self.resolution % 16 == 0, f"data.resolution: must be a positive multiple of 16, got {self.resolution!r}"
        )
        _require(
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
        _validate(self, "optim")
        _require(self.optimizer in OPTIMIZERS, f"optim.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _require(
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
        _validate(self, "ema")
        _require(
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
        _validate(self, "objective")
        _require(
            self.sigma_sampler in SIGMA_SAMPLERS,
            f"objective.sigma_sampler must be one of {SIGMA_SAMPLERS}, got {self.sigma_sampler!r}",
        )
        _require(
            self.shift_rule in SHIFT_RULES,
            f"objective.shift_rule must be one of {SHIFT_RULES}, got {self.shift_rule!r}",
        )
        _require(
            self.shift_rule == "fixed" or self.sigma_sampler in SHIFTED_SAMPLERS,
            f"objective.shift_rule {self.shift_rule!r} shifts only {SHIFTED_SAMPLERS}; sigma_sampler "
            f"{self.sigma_sampler!r} has no shift: set shift_rule to 'fixed' or pick a shifted sampler",
        )
        _require(
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
        _validate(self, "preview")
        for name in ("width", "height"):
            value = getattr(self, name)
            _require(value % 16 == 0, f"preview.{name}: must be a multiple of 16 (VAE 8 x patch 2), got {value!r}")


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
        _validate(self, "run")
        _require(bool(self.output_dir), "run.output_dir is empty: give the run folder")

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
    preview: PreviewSection = field(default_factory=PreviewSection)
    resolutions: ResolutionSection = field(default_factory=ResolutionSection)  # multi-resolution schedule
    ema: EmaSection = field(default_factory=EmaSection)
    plan: dict[str, Any] | None = None  # the TrainingPlan that chose micro-batch, depth, ...: kept for the record

    def __post_init__(self):
        _validate(self, "")
        _require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _require(
            not (self.run.fp8 and self.mode == "qlora"),
            "run.fp8 cannot be combined with mode 'qlora' (the base is already 4-bit): turn one off",
        )
        unsupported = qlora_unsupported(self.lora.adapter) if self.mode == "qlora" else None
        _require(unsupported is None, f"lora.adapter: {unsupported}")
        _check_parallel(self)
        check_variant_config(self)
        _check_small_card_levers(self)
        for resolution in self.resolutions.resolutions:
            self.resolutions.sizes(resolution, self.run)  # every resolution keeps the effective batch
        _require(
            not (self.ema.placement != "off" and self.optim.optimizer == "schedulefree_adamw"),
            "ema.placement with optim.optimizer 'schedulefree_adamw': schedule-free AdamW already saves an average of "
            "the weights; set ema.placement to 'off' or choose another optimizer",
        )

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
            if section not in PLAN_DECIDES and section not in ("objective", "preview", "resolutions", "ema"):
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
    "run": (
        "micro_batch",
        "grad_accum",
        "checkpoint_depth",
        "compile",
        "nccl_timeout_s",
        "fsdp_cpu_offload",
        "fp8_base",
        "swap_blocks",
    ),
    "model": ("dtype", "attention_backend"),
    "lora": ("rank", "targets", "adapter"),
    "data": ("max_caption_tokens", "caption_overflow"),
    "optim": ("lr", "optimizer"),
    "parallel": ("strategy",),
    "ema": ("placement",),
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
            "fp8_base": getattr(plan, "base_storage", "bf16") == "fp8",
            "swap_blocks": getattr(plan, "swap_blocks", 0),
        },
        "model": {"dtype": plan.precision, "attention_backend": plan.attention_backend},
        "lora": {"rank": plan.lora_rank, "targets": plan.lora_targets, "adapter": getattr(plan, "adapter", "lora")}
        if plan.mode in LORA_MODES
        else {},
        "data": {"max_caption_tokens": plan.caption_tokens, "caption_overflow": plan.caption_overflow},
        "optim": {"lr": plan.lr, "optimizer": plan.optimizer},
        "parallel": {"strategy": plan.parallelism},
        "ema": {"placement": plan.ema},
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


def _check_small_card_levers(config: TrainConfig) -> None:
    """FP8 base storage and block swap are levers of LoRA on a bf16/fp8 base (``hardware.levers`` plans them)."""
    run = config.run
    _require(
        not ((run.fp8_base or run.swap_blocks) and config.mode != "lora"),
        f"run.fp8_base / run.swap_blocks are for mode 'lora'; mode {config.mode!r} keeps its own base: turn them off",
    )
    _require(
        not (run.fp8_base and run.fp8),
        "run.fp8_base (e4m3 storage, upcast per layer) and run.fp8 (FP8 matmuls) convert the same layers: choose one",
    )
    _require(
        not run.swap_blocks or run.swap_blocks <= run.checkpoint_depth,
        f"run.swap_blocks={run.swap_blocks} needs run.checkpoint_depth >= {run.swap_blocks}: swapped blocks are "
        "checkpointed (their weights are reloaded for the backward, not kept)",
    )
    _require(
        not (run.swap_blocks and run.compile),
        "run.swap_blocks with run.compile: block swap's hooks run between the blocks, which torch.compile would "
        "trace; set run.compile to false",
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
