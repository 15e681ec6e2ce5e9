"""Load and save Z-Image transformer weights: ComfyUI single-file and diffusers layouts, safetensors only.

Loading builds the model on the meta device, then reads one tensor at a time from the files (plain reads at the
offsets in the header, no mmap) into a freshly allocated tensor of the target dtype and device: straight into it when
the dtype matches, else through one temporary. Peak memory is the loaded model plus one source tensor. Saving streams
too: each tensor goes to the CPU and onto disk on its own, into a temp file that then replaces the target.
Pickle-based checkpoints (.ckpt/.pt/.bin) are refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..atomic import write_text_atomic
from .config import ZImageConfig
from .layouts import COMFY_CHECKPOINT_PREFIX, comfy_name, diffusers_names, is_diffusers_layout, strip_comfy_prefix
from .safetensors_io import (
    DTYPES,
    TensorSource,
    WeightsError,
    read_into,
    read_sources,
    write_safetensors,
)
from .zimage import ZImageTransformer

log = logging.getLogger(__name__)

Layout = Literal["comfy", "diffusers"]
PathLike = str | os.PathLike
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX_NAME = DIFFUSERS_WEIGHTS_NAME + ".index.json"
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
#: Present in some single-file releases (a Lumina-2 leftover that no implementation uses); skipped when loading.
_IGNORED_KEYS = frozenset({"norm_final.weight"})
_SHOWN = 5  # keys listed per category in error messages
_WHAT_TO_DO = (
    "Pick a Z-Image transformer in safetensors form: a ComfyUI diffusion_models/ file, a full ComfyUI checkpoint, "
    "or a diffusers transformer/ folder (or its *.safetensors.index.json)."
)


# ---------------------------------------------------------------------------------------------------------------------
# Locating files and reading safetensors headers


def resolve_files(path_or_paths: PathLike | Sequence[PathLike]) -> list[Path]:
    """The .safetensors files behind a file, a ``*.safetensors.index.json``, a folder holding one, or a list."""
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not paths:
        raise WeightsError("no weight files given; pass a .safetensors file, an index .json or a folder")
    files: list[Path] = []
    for path in map(Path, paths):
        files.extend(f for f in _resolve_one(path) if f not in files)
    return files


def _resolve_one(path: Path) -> list[Path]:
    if path.is_dir():
        return _resolve_one(_pick_in_folder(path))
    name = path.name.lower()
    if name.endswith(_PICKLE_SUFFIXES):
        raise WeightsError(
            f"{path}: pickle checkpoints are refused because loading them can run arbitrary code; "
            "convert the file to .safetensors (or download the .safetensors release) and load that"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if name.endswith(".index.json"):
        return [file for shard in _index_shards(path) for file in _resolve_one(shard)]
    if name.endswith(".safetensors"):
        return [path]
    raise WeightsError(f"{path}: expected a .safetensors file, a *.safetensors.index.json or a folder holding one")


def _index_shards(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise WeightsError(f"{index_path}: not a sharded-weights index with a 'weight_map' ({error})") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path}: 'weight_map' must map tensor names to shard files")
    return [index_path.parent / shard for shard in sorted(set(weight_map.values()))]


def _pick_in_folder(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    indexed = {shard for index in indexes for shard in _index_shards(index)}
    singles = [f for f in sorted(folder.glob("*.safetensors")) if f not in indexed]
    candidates = indexes + singles
    if not candidates and (folder / "transformer").is_dir():
        return folder / "transformer"  # a diffusers pipeline folder
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "no .safetensors or *.safetensors.index.json"
        raise WeightsError(f"{folder}: expected exactly one set of weights, found {found}; pass the file to load")
    return candidates[0]


def read_header(path: PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name → (safetensors dtype, shape) from a file's header, without reading any tensor data."""
    return {key: (source.dtype, source.shape) for key, source in read_sources(Path(path)).items()}


# ---------------------------------------------------------------------------------------------------------------------
# Layout detection, name mapping and config inference


def detect_layout(names: Iterable[str]) -> Layout:
    """'diffusers' when names use to_q/to_k/to_v or all_x_embedder, else 'comfy' (prefix or not)."""
    return "diffusers" if is_diffusers_layout(strip_comfy_prefix(n) for n in names) else "comfy"


@dataclass(frozen=True)
class _Plan:
    """Where each of our parameters comes from: one source, or q/k/v sources stacked along dim 0."""

    files: list[Path]
    layout: Layout
    sources: dict[str, list[TensorSource]]

    def shape(self, name: str) -> tuple[int, ...]:
        parts = self.sources[name]
        return (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) if len(parts) > 1 else parts[0].shape

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self.sources}


def _plan(files: list[Path]) -> _Plan:
    raw: dict[str, TensorSource] = {}
    for file in files:
        for key, source in read_sources(file).items():
            if key in raw:
                raise WeightsError(f"tensor {key!r} appears in both {raw[key].file} and {file}; load one of them")
            raw[key] = source
    if any(k.startswith(COMFY_CHECKPOINT_PREFIX) for k in raw):  # full checkpoint: keep the diffusion model only
        kept = {strip_comfy_prefix(k): s for k, s in raw.items() if k.startswith(COMFY_CHECKPOINT_PREFIX)}
        log.info(
            "full checkpoint: loading %d diffusion-model tensors, skipping %d others", len(kept), len(raw) - len(kept)
        )
        raw = kept
    layout = detect_layout(raw)
    sources: dict[str, dict[int, TensorSource]] = {}
    for key, source in raw.items():
        if key in _IGNORED_KEYS:
            log.debug("skipping unused tensor %s", key)
            continue
        name, part = comfy_name(key) if layout == "diffusers" else (key, None)
        slots, slot = sources.setdefault(name, {}), -1 if part is None else part
        if slot in slots:
            raise WeightsError(f"{source.file}: tensor {name!r} is stored twice (as {slots[slot].key} and {key})")
        slots[slot] = source
    for name, slots in sources.items():
        if sorted(slots) not in ([-1], [0, 1, 2]):
            got = "".join("qkv"[i] for i in sorted(slots) if i >= 0)
            raise WeightsError(f"{files[0]}: {name} has q/k/v parts {got!r} only (or fused and split both)")
    return _Plan(files, layout, {name: [slots[i] for i in sorted(slots)] for name, slots in sources.items()})


def _block_indices(names: Iterable[str], group: str) -> set[int]:
    pattern = re.compile(rf"^{group}\.(\d+)\.")
    return {int(m[1]) for m in map(pattern.match, names) if m}


def infer_config(keys_and_shapes: Mapping[str, Sequence[int]], *, base: ZImageConfig | None = None) -> ZImageConfig:
    """The architecture a file holds, from its tensor names and shapes (either layout, prefix or not).

    Weights cannot tell patch size from channels, nor RoPE axis split: those come from ``base`` (default: the
    published config), except that ``axes_dims`` is rescaled to the 1/4, 3/8, 3/8 split when head_dim differs."""
    base = base or ZImageConfig()
    kept = {strip_comfy_prefix(k): tuple(s) for k, s in keys_and_shapes.items()}
    if is_diffusers_layout(kept):
        kept = {comfy_name(k)[0]: s for k, s in kept.items()}
    required = ("cap_embedder.1.weight", "layers.0.attention.q_norm.weight", "layers.0.feed_forward.w1.weight")
    required += ("x_embedder.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight")
    missing = [k for k in required if k not in kept]
    if missing:
        raise WeightsError(f"these keys are not a Z-Image transformer's: missing {', '.join(missing)}")
    dim, cap_feat_dim = kept["cap_embedder.1.weight"]
    (head_dim,) = kept["layers.0.attention.q_norm.weight"]
    patch_dim = kept["x_embedder.weight"][1]
    t_hidden, t_freq = kept["t_embedder.mlp.0.weight"]
    modulation = kept["t_embedder.mlp.2.weight"][0]
    if dim % head_dim or patch_dim % base.patch_size**2:
        raise WeightsError(f"not a Z-Image transformer: dim {dim}, head dim {head_dim}, patch vector {patch_dim}")
    axes = base.axes_dims
    if sum(axes) != head_dim:
        if head_dim % 16:
            raise WeightsError(f"cannot infer RoPE axes_dims for head_dim {head_dim}; pass an explicit config")
        axes = (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)
    return base.replace(
        dim=dim,
        n_layers=len(_block_indices(kept, "layers")),
        n_refiner_layers=len(_block_indices(kept, "noise_refiner")),
        n_heads=dim // head_dim,
        ffn_hidden_dim=kept["layers.0.feed_forward.w1.weight"][0],
        cap_feat_dim=cap_feat_dim,
        in_channels=patch_dim // base.patch_size**2,
        axes_dims=axes,
        t_embed_hidden_dim=t_hidden,
        t_freq_dim=t_freq,
        adaln_dim=base.adaln_dim if min(dim, base.adaln_dim) == modulation else modulation,
    )


def _mismatch_error(plan: _Plan, expected: Mapping[str, tuple[int, ...]], what: str, hint: str) -> WeightsError:
    found = plan.shapes()
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {list(found[k])} (expected {list(s)})" for k, s in expected.items() if k in found and found[k] != s]
    lines = [f"{', '.join(map(str, plan.files))} is not {what} ({plan.layout} layout read):"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", wrong)):
        if items:
            more = f", … {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
            lines.append(f"  {len(items)} {label}: {', '.join(items[:_SHOWN])}{more}")
    return WeightsError("\n".join([*lines, hint]))


def _describe(config: ZImageConfig) -> str:
    return f"dim={config.dim}, n_layers={config.n_layers}, n_refiner_layers={config.n_refiner_layers}"


def _other_size_hint(plan: _Plan) -> str:
    try:
        found = infer_config(plan.shapes())
    except WeightsError:  # not Z-Image at all: the key summary says enough
        return ""
    return f"The file holds Z-Image with {_describe(found)}: load it without `config` to use that size. "


def _config_for(plan: _Plan) -> ZImageConfig:
    try:
        return infer_config(plan.shapes())
    except WeightsError as error:
        with torch.device("meta"):
            reference = ZImageTransformer(ZImageConfig()).state_dict()
        expected = {name: tuple(t.shape) for name, t in reference.items()}
        raise _mismatch_error(plan, expected, "a Z-Image transformer", _WHAT_TO_DO) from error


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def load_transformer(
    path_or_paths: PathLike | Sequence[PathLike],
    *,
    config: ZImageConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> ZImageTransformer:
    """Build the transformer on the meta device and stream its weights in; ``config`` None infers it."""
    plan = _plan(resolve_files(path_or_paths))
    hint = _WHAT_TO_DO if config is None else f"{_other_size_hint(plan)}{_WHAT_TO_DO}"
    config = config or _config_for(plan)
    with torch.device("meta"):
        model = ZImageTransformer(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if plan.shapes() != expected:
        raise _mismatch_error(plan, expected, f"a Z-Image transformer with {_describe(config)}", hint)
    model.load_state_dict(_materialize(plan, list(expected), dtype, device), strict=True, assign=True)
    assert not any(t.is_meta for t in model.state_dict().values()), "a parameter was left on the meta device"
    log.info("loaded %s (%s layout) as %s on %s", ", ".join(map(str, plan.files)), plan.layout, dtype, device)
    return model


def read_state_dict(
    path: PathLike | Sequence[PathLike], *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Every transformer tensor of a file (or index / folder), in our names, on the CPU; ``dtype`` None keeps
    the file's. Not checked against any config: use load_transformer for that."""
    plan = _plan(resolve_files(path))
    return _materialize(plan, list(plan.sources), dtype, "cpu")


def tensor_shapes(path: PathLike | Sequence[PathLike]) -> dict[str, tuple[int, ...]]:
    """Our name -> shape of every transformer tensor of a file (either layout), from its header."""
    return _plan(resolve_files(path)).shapes()


def stream_tensors(path: PathLike | Sequence[PathLike], names: Sequence[str] | None = None, *, dtype=None):
    """(our name, tensor on the CPU) of the transformer tensors ``names`` (None: all) of a file, one at a time, in
    that order (memory: one tensor)."""
    plan = _plan(resolve_files(path))
    for name in plan.sources if names is None else names:
        yield name, _materialize(plan, [name], dtype, "cpu")[name]


def _materialize(
    plan: _Plan, names: list[str], dtype: torch.dtype | None, device: str | torch.device
) -> dict[str, torch.Tensor]:
    state = {}
    with ExitStack() as stack:
        files = {path: stack.enter_context(open(path, "rb")) for path in plan.files}
        for name in names:
            parts = plan.sources[name]
            out = torch.empty(plan.shape(name), dtype=dtype or DTYPES[parts[0].dtype], device=device)
            row = 0
            for part in parts:  # q/k/v land in their rows of the preallocated fused tensor
                read_into(files[part.file], part, out[row : row + part.shape[0]] if len(parts) > 1 else out)
                row += part.shape[0] if part.shape else 1
            state[name] = out
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Saving


def save_weights(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    layout: Layout = "comfy",
    prefix: bool = False,
    shard_size: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write weights (our names) in ComfyUI or diffusers layout; returns the file (or index) written.

    comfy: ``path`` is a .safetensors file; ``prefix`` adds ``model.diffusion_model.``. diffusers: ``path`` is a
    .safetensors file, or a folder that gets ``diffusion_pytorch_model.safetensors`` (or, with ``shard_size`` bytes,
    shards plus ``diffusion_pytorch_model.safetensors.index.json``). Tensors may live on any device."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    path = Path(path)
    _check_save_args(path, layout, prefix, shard_size, metadata)
    if layout == "comfy":
        key = COMFY_CHECKPOINT_PREFIX if prefix else ""
        write_safetensors(path, [(key + name, t) for name, t in state.items()], metadata)
        return path
    entries = []
    for name, tensor in state.items():
        targets = diffusers_names(name)
        entries.extend(zip(targets, tensor.chunk(len(targets), dim=0)))
    if path.suffix == ".safetensors":
        write_safetensors(path, entries, metadata)
        return path
    return _write_diffusers_folder(path, entries, shard_size, metadata)


def _check_save_args(path: Path, layout: str, prefix: bool, shard_size: int | None, metadata) -> None:
    if layout not in ("comfy", "diffusers"):
        raise ValueError(f"layout={layout!r} is not supported; use 'comfy' or 'diffusers'")
    if layout == "comfy" and (path.suffix != ".safetensors" or shard_size is not None):
        raise ValueError(f"comfy layout writes one .safetensors file, got path={path}, shard_size={shard_size}")
    if layout == "diffusers" and prefix:
        raise ValueError("prefix=True only applies to layout='comfy' (diffusers files have no prefix)")
    if shard_size is not None and (shard_size <= 0 or path.suffix == ".safetensors"):
        raise ValueError(f"shard_size={shard_size} needs a positive size and a folder path, got {path}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"metadata must map str to str (safetensors headers hold text only), got {metadata!r}")


def _write_diffusers_folder(folder: Path, entries, shard_size: int | None, metadata) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[1].numel() * entry[1].element_size()
        if shard_size is not None and shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    count = len(shards)
    names = [f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    written = [folder / name for name in (names if count > 1 else [DIFFUSERS_WEIGHTS_NAME])]
    for file, shard in zip(written, shards):
        write_safetensors(file, shard, metadata)
    if len(shards) > 1:
        weight_map = {name: file.name for file, shard in zip(written, shards) for name, _ in shard}
        total = sum(t.numel() * t.element_size() for _, t in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written.append(folder / DIFFUSERS_INDEX_NAME)
        write_text_atomic(written[-1], json.dumps(index, indent=2, sort_keys=True))
    for stale in set(folder.glob("diffusion_pytorch_model*.safetensors*")) - set(written):
        log.info("removing %s left over from an earlier save", stale)
        stale.unlink()
    return written[-1]
