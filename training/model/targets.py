"""LoRA target presets: the one table of which blocks and which linears get an adapter, and the parameter count it
implies for a ``ZImageConfig`` (torch-free, so the planner reads the same table the engine attaches from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .config import ZImageConfig

LoraTargets = Literal["attention", "attention+ffn", "attention+ffn+refiners", "all"]


@dataclass(kw_only=True, frozen=True)
class TargetPreset:
    """Which block groups of the transformer and which linear layers inside each block get a LoRA."""

    block_groups: tuple[str, ...]
    modules: tuple[str, ...]
    description: str

    @property
    def trains_refiners(self) -> bool:
        """Whether the refiner blocks build an autograd graph (their inputs come from frozen embedders otherwise)."""
        return any(group in REFINER_GROUPS for group in self.block_groups)


_ATTENTION = ("attention.qkv", "attention.out")
_FFN = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
REFINER_GROUPS = ("noise_refiner", "context_refiner")
_ALL_BLOCKS = (*REFINER_GROUPS, "layers")
ADALN = "adaLN_modulation.0"

#: Ordered from the narrowest preset to the widest (``infer_targets`` relies on it).
TARGET_PRESETS: dict[str, TargetPreset] = {
    "attention": TargetPreset(block_groups=("layers",), modules=_ATTENTION, description="attention of the main layers"),
    "attention+ffn": TargetPreset(
        block_groups=("layers",), modules=_ATTENTION + _FFN, description="attention and feed-forward of the main layers"
    ),
    "attention+ffn+refiners": TargetPreset(
        block_groups=_ALL_BLOCKS, modules=_ATTENTION + _FFN, description="attention and feed-forward of every block"
    ),
    "all": TargetPreset(
        block_groups=_ALL_BLOCKS,
        modules=_ATTENTION + _FFN + (ADALN,),
        description="attention, feed-forward and adaLN modulation of every block",
    ),
}
LORA_TARGETS: tuple[str, ...] = get_args(LoraTargets)
assert LORA_TARGETS == tuple(TARGET_PRESETS), "LoraTargets and TARGET_PRESETS must list the same presets"
DEFAULT_TARGETS: LoraTargets = "attention+ffn"
DEFAULT_LORA_RANK = 32  # styles and characters; the Plan node, the plan CLI and the workflows start here


def target_preset(targets: str) -> TargetPreset:
    try:
        return TARGET_PRESETS[targets]
    except KeyError:
        raise ValueError(f"unknown LoRA targets {targets!r}; choose one of {list(TARGET_PRESETS)}") from None


def linear_shapes(config: ZImageConfig, modulated: bool) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every targetable linear of one block (``training.model.layers``)."""
    d, h = config.dim, config.ffn_hidden_dim
    shapes = {
        "attention.qkv": (d, 3 * d),
        "attention.out": (d, d),
        "feed_forward.w1": (d, h),
        "feed_forward.w2": (h, d),
        "feed_forward.w3": (d, h),
    }
    if modulated:
        shapes[ADALN] = (config.modulation_dim, 4 * d)
    return shapes


def block_groups(config: ZImageConfig) -> dict[str, tuple[int, bool]]:
    """Block group name → (number of blocks, whether they are adaLN-modulated), as ``ZImageTransformer`` builds them."""
    return {
        "noise_refiner": (config.n_refiner_layers, True),
        "context_refiner": (config.n_refiner_layers, False),
        "layers": (config.n_layers, True),
    }


def lora_param_count(config: ZImageConfig, rank: int, targets: str) -> int:
    """Trainable LoRA parameters of a preset: r x (in + out) for every targeted linear that exists in each block
    (the fused qkv has one A [r, d] and one B [3d, r]; unmodulated blocks have no adaLN to target)."""
    preset = target_preset(targets)
    total = 0
    for group, (count, modulated) in block_groups(config).items():
        if group in preset.block_groups:
            shapes = linear_shapes(config, modulated)
            total += count * sum(rank * sum(shapes[m]) for m in preset.modules if m in shapes)
    return total


def infer_targets(modules: list[str]) -> str:
    """The narrowest preset whose blocks and linears cover every module name (e.g. from a LoRA file)."""
    for name, preset in TARGET_PRESETS.items():
        if all(_covers(preset, module) for module in modules):
            return name
    raise ValueError(f"no LoRA target preset covers modules such as {modules[:3]}; presets: {list(TARGET_PRESETS)}")


def _covers(preset: TargetPreset, module: str) -> bool:
    group, _, rest = module.partition(".")
    _, _, linear = rest.partition(".")
    return group in preset.block_groups and linear in preset.modules
