"""The one validated config file a training run reads (``<run>/config.json``).

Typed kw_only dataclasses; unknown keys are errors naming the section and the allowed keys, so a typo never
silently falls back to a default. The sections are defined in ``config_sections`` (importable from here too), the
field checks in ``config_fields``; this module holds ``TrainConfig``, the checks across sections and the plan contract.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomic
from ..model.targets import qlora_unsupported
from ..vocabulary import LORA_MODES, MODES
from .config_fields import build_from_dict, require, validate
from .config_sections import (
    DataSection,
    EmaSection,
    LoraSection,
    ModelSection,
    ObjectiveSection,
    OptimSection,
    ParallelSection,
    PreviewSection,
    RunSection,
)
from .resolution_schedule import ResolutionSection
from .variant_setup import check_variant_config


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
        validate(self, "")
        require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        require(
            not (self.run.fp8 and self.mode == "qlora"),
            "run.fp8 cannot be combined with mode 'qlora' (the base is already 4-bit): turn one off",
        )
        unsupported = qlora_unsupported(self.lora.adapter) if self.mode == "qlora" else None
        require(unsupported is None, f"lora.adapter: {unsupported}")
        _check_parallel(self)
        check_variant_config(self)
        _check_small_card_levers(self)
        for resolution in self.resolutions.resolutions:
            self.resolutions.sizes(resolution, self.run)  # every resolution keeps the effective batch
        require(
            not (self.ema.placement != "off" and self.optim.optimizer == "schedulefree_adamw"),
            "ema.placement with optim.optimizer 'schedulefree_adamw': schedule-free AdamW already saves an average of "
            "the weights; set ema.placement to 'off' or choose another optimizer",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return build_from_dict(cls, data, "config")

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
    require(
        not (strategy == "fsdp2" and config.mode in LORA_MODES),
        f"parallel.strategy 'fsdp2' is for mode 'full'; mode {config.mode!r} replicates with 'ddp' (or use 'auto')",
    )
    require(
        not (strategy == "ddp" and config.mode == "full"),
        "parallel.strategy 'ddp' cannot train mode 'full' (it would replicate fp32 AdamW states): use 'fsdp2'",
    )
    require(
        not (config.run.fsdp_cpu_offload and config.mode in LORA_MODES),
        f"run.fsdp_cpu_offload is for mode 'full' (FSDP2); mode {config.mode!r} does not shard: set it to false",
    )


def _check_small_card_levers(config: TrainConfig) -> None:
    """FP8 base storage and block swap are levers of LoRA on a bf16/fp8 base (``hardware.levers`` plans them)."""
    run = config.run
    require(
        not ((run.fp8_base or run.swap_blocks) and config.mode != "lora"),
        f"run.fp8_base / run.swap_blocks are for mode 'lora'; mode {config.mode!r} keeps its own base: turn them off",
    )
    require(
        not (run.fp8_base and run.fp8),
        "run.fp8_base (e4m3 storage, upcast per layer) and run.fp8 (FP8 matmuls) convert the same layers: choose one",
    )
    require(
        not run.swap_blocks or run.swap_blocks <= run.checkpoint_depth,
        f"run.swap_blocks={run.swap_blocks} needs run.checkpoint_depth >= {run.swap_blocks}: swapped blocks are "
        "checkpointed (their weights are reloaded for the backward, not kept)",
    )
    require(
        not (run.swap_blocks and run.compile),
        "run.swap_blocks with run.compile: block swap's hooks run between the blocks, which torch.compile would "
        "trace; set run.compile to false",
    )
