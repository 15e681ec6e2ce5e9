"""LoRA target presets: the one table of which blocks and which linears get an adapter, and the parameter count it
implies for a ``ZImageConfig`` (torch-free, so the planner reads the same table the engine attaches from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..vocabulary import ADAPTER_TYPES
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


def kronecker_factors(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension, as peft 0.21's ``lokr.layer.factorization`` splits a width: ``factor`` when it
    divides the width (as (factor, dimension // factor), in that order), else the pair closest to a square with
    m <= factor (factor -1: no bound). Kept torch-free so the planner prices exactly the shapes peft creates."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        if new_m > factor:
            break
        m, n = new_m, dimension // new_m
    return min(m, n), max(m, n)


def lokr_decompose_factor(linears: dict[str, tuple[int, int]]) -> int:
    """peft's LoKr ``decompose_factor`` for these targeted linears (name → (in_features, out_features)).

    -1 (peft's default: near-square factors) unless a fused ``attention.qkv`` [3d, d] is targeted. Its default
    factors (for Z-Image 11520 = 96 x 120) split q/k/v into thirds of shape (32 x 120) x (60 x 64), which no per-
    projection LoKr has: diffusers rebuilds a LoKr file's modules from one factor and cannot. With factor 3a, where
    d = a x b is a [d, d] linear's near-square split, the qkv's rows split as 3a x b (180 x 64) and each third is a
    LoKr of exactly a [d, d] linear's default shape (60 x 64) x (60 x 64): w1 holds q/k/v's own rows, w2 is shared.
    The factor must leave every other targeted width at its default split; otherwise a ValueError says which."""
    fused = {shape for name, shape in linears.items() if name.endswith("attention.qkv")}
    if not fused:
        return -1
    if len(fused) > 1 or next(iter(fused))[1] != 3 * next(iter(fused))[0]:
        raise ValueError(f"LoKr: fused qkv linears must all be [3d, d]; got (in, out) {sorted(fused)}")
    d = next(iter(fused))[0]
    a, b = kronecker_factors(d)
    factor = 3 * a
    widths = {width for name, (i, o) in linears.items() for width in (i, o) if not name.endswith("attention.qkv")}
    moved = sorted(w for w in widths | {d} if kronecker_factors(w, factor) != kronecker_factors(w))
    if moved or kronecker_factors(3 * d, factor) != (factor, b):
        raise ValueError(
            f"LoKr on a fused qkv [{3 * d}, {d}]: its q/k/v thirds are exact diffusers-loadable LoKrs only with "
            f"decompose factor {factor} (rows {factor} x {b}), and that factor would also change the split of the "
            f"widths {moved} (peft applies one factor to every layer). Target without attention, or use "
            "LoRA/LoHa/DoRA"
        )
    return factor


def lokr_shapes(
    in_features: int, out_features: int, rank: int, factor: int = -1
) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """LoKr of one linear as peft builds it (``decompose_both`` off, ``decompose_factor`` ``factor``): w1
    [out_l, in_m] (always a full matrix), w2 [out_k, in_n], and whether w2 is rank-decomposed into
    w2_a [out_k, r] @ w2_b [r, in_n]."""
    out_l, out_k = kronecker_factors(out_features, factor)
    in_m, in_n = kronecker_factors(in_features, factor)
    return (out_l, in_m), (out_k, in_n), rank < max(out_k, in_n) / 2


def adapter_linear_params(in_features: int, out_features: int, rank: int, adapter: str, lokr_factor: int = -1) -> int:
    """Trainable parameters one adapter type adds to one linear (peft's shapes)."""
    if adapter == "lora":
        return rank * (in_features + out_features)
    if adapter == "dora":  # LoRA plus one magnitude per output row
        return rank * (in_features + out_features) + out_features
    if adapter == "loha":  # two LoRA-shaped pairs, multiplied elementwise
        return 2 * rank * (in_features + out_features)
    if adapter == "lokr":
        (out_l, in_m), (out_k, in_n), decomposed = lokr_shapes(in_features, out_features, rank, lokr_factor)
        return out_l * in_m + (rank * (out_k + in_n) if decomposed else out_k * in_n)
    raise ValueError(f"unknown adapter type {adapter!r}; choose one of {list(ADAPTER_TYPES)}")


def targeted_linears(config: ZImageConfig, targets: str) -> dict[str, tuple[int, int]]:
    """Every targeted linear of one block of each targeted group: ``<group>.<linear>`` → (in, out)."""
    preset = target_preset(targets)
    linears = {}
    for group, (_, modulated) in block_groups(config).items():
        if group in preset.block_groups:
            shapes = linear_shapes(config, modulated)
            linears |= {f"{group}.{m}": shapes[m] for m in preset.modules if m in shapes}
    return linears


def adapter_param_count(config: ZImageConfig, rank: int, targets: str, adapter: str = "lora") -> int:
    """Trainable parameters of a preset for one adapter type, over every targeted linear of every block."""
    linears = targeted_linears(config, targets)
    factor = lokr_decompose_factor(linears) if adapter == "lokr" else -1
    counts = dict(block_groups(config))
    return sum(
        counts[name.partition(".")[0]][0] * adapter_linear_params(*shape, rank, adapter, factor)
        for name, shape in linears.items()
    )


def qlora_unsupported(adapter: str) -> str | None:
    """Why ``adapter`` cannot train on the NF4 base of mode 'qlora', or None. peft 0.21's LoKr and LoHa reshape
    their delta weight to ``base_layer.weight.shape``, which for a bitsandbytes ``Linear4bit`` is the packed 4-bit
    storage ([out·in/2, 1]), so the first forward fails (RuntimeError: shape '[6144, 1]' is invalid …);
    tests/test_adapters.py checks that this is still so (torch-free here: the config validates with it). LoRA and DoRA dequantize the base and work."""
    if adapter in ("lokr", "loha"):
        return (
            f"adapter {adapter!r} cannot train on mode 'qlora': peft's {adapter.upper()} layers build their delta "
            "in the base weight's shape, which for a 4-bit (bitsandbytes NF4) base is its packed storage, so the "
            "forward fails. Use mode 'lora' (bf16 base) with this adapter, or adapter 'lora' / 'dora' with 'qlora'"
        )
    return None
