"""The command-line flags for the variant and the training recipe (``plan --write-config`` writes them into the
run config): one flag per config key, named after it, with the config's vocabulary as choices."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..vocabulary import LOSS_WEIGHTINGS, MODEL_VARIANT_CHOICES, SHIFT_RULES, SIGMA_SAMPLERS, TURBO_TRAININGS

#: flag destination → (config section, key)
FLAG_KEYS = {
    "model_variant": ("model", "variant"),
    "turbo_training": ("model", "turbo_training"),
    "training_adapter": ("model", "training_adapter"),
    "sigma_sampler": ("objective", "sigma_sampler"),
    "shift": ("objective", "shift"),
    "shift_rule": ("objective", "shift_rule"),
    "logit_mean": ("objective", "logit_mean"),
    "logit_std": ("objective", "logit_std"),
    "loss_weighting": ("objective", "loss_weighting"),
}


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """Flags left unset keep the config's defaults (docs/training.md); TrainConfig validates the values."""
    group = parser.add_argument_group("variant and recipe (written by --write-config; see docs/training.md)")
    group.add_argument("--model-variant", choices=MODEL_VARIANT_CHOICES, help="model.variant (default auto)")
    group.add_argument("--turbo-training", choices=TURBO_TRAININGS, help="model.turbo_training (Turbo only)")
    group.add_argument("--training-adapter", type=Path, help="model.training_adapter: Turbo's de-distillation LoRA")
    group.add_argument("--sigma-sampler", choices=SIGMA_SAMPLERS, help="objective.sigma_sampler")
    group.add_argument("--shift", type=float, help="objective.shift (the shifted samplers')")
    group.add_argument("--shift-rule", choices=SHIFT_RULES, help="objective.shift_rule")
    group.add_argument("--logit-mean", type=float, help="objective.logit_mean")
    group.add_argument("--logit-std", type=float, help="objective.logit_std")
    group.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, help="objective.loss_weighting")


def recipe_sections(args: argparse.Namespace) -> dict[str, dict]:
    """{"model": {...}, "objective": {...}} with the flags that were given."""
    sections: dict[str, dict] = {"model": {}, "objective": {}}
    for flag, (section, key) in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            sections[section][key] = str(value.resolve()) if isinstance(value, Path) else value
    return sections
