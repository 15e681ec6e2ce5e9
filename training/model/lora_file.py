"""LoRA ``.safetensors`` files in the form ComfyUI and diffusers load, and merging any such file into our model.

Keys are ``diffusion_model.<diffusers module>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r] and ``.alpha``
(float32 scalar). Our fused ``attention.qkv`` LoRA is written as three modules ``to_q``/``to_k``/``to_v`` sharing a
copy of A, with B split into three row blocks; ComfyUI maps them back onto rows 0/d/2d of the fused weight.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from . import adapter_file
from .layouts import comfy_name, diffusers_names
from .lora import LoraSettings
from .safetensors_io import cast_in_place, host_copy, write_safetensors
from .targets import TARGET_PRESETS, infer_targets

logger = logging.getLogger(__name__)

FORMAT_NAME = "whetstone.zimage-lora"
FORMAT_VERSION = "1"
FILE_PREFIX = "diffusion_model."
ACCEPTED_PREFIXES = ("diffusion_model.", "transformer.")
SAVE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
RESERVED_METADATA = (
    "format",
    "format_version",
    "base_model",
    "adapter",
    "rank",
    "alpha",
    "dropout",
    "targets",
    "dtype",
)

# Key endings ComfyUI accepts for plain LoRA tensors → "down" (A), "up" (B) or "alpha".
_ENDINGS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".alpha": "alpha",
}


@dataclass(kw_only=True, frozen=True)
class LoraFile:
    state: dict[str, torch.Tensor]  # our names, e.g. layers.0.attention.qkv.lora_A.weight, fused qkv reassembled
    settings: LoraSettings
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True, frozen=True)
class RowDelta:
    """scale · B @ A (float32, strength not applied) for rows [row_offset, row_offset + rows) of one weight."""

    row_offset: int
    delta: torch.Tensor
    keys: tuple[str, ...]  # the file keys it was built from


# ---- saving ---------------------------------------------------------------------------------------------------------


def _split_state(state: dict[str, torch.Tensor], rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our LoRA state → module name → (A, B), checking that every module has both and the expected rank."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        module, dot, kind = key.removesuffix(".weight").rpartition(".")
        if not dot or kind not in ("lora_A", "lora_B") or not key.endswith(".weight"):
            raise ValueError(f"LoRA state key {key!r} is not of the form '<module>.lora_A.weight' / '.lora_B.weight'")
        modules[module][kind] = tensor
    pairs = {}
    for module, parts in modules.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA state for {module!r} has {sorted(parts)}, needs both lora_A and lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"LoRA {module!r} has A {tuple(a.shape)}, B {tuple(b.shape)}, but settings.rank is {rank}")
        pairs[module] = (a, b)
    return pairs


def _file_tensors(
    state: dict[str, torch.Tensor], settings: LoraSettings, dtype: torch.dtype, convert=host_copy
) -> dict:
    """The file's tensors in ``dtype``: host copies, or (``convert=cast_in_place``, LoRA only) cast where they are,
    for a caller that copies them to the host itself."""
    if settings.adapter != "lora":
        return adapter_file.file_tensors(state, settings, dtype, FILE_PREFIX)
    tensors = {}
    alpha = torch.tensor(settings.effective_alpha, dtype=torch.float32)
    for module, (a, b) in _split_state(state, settings.rank).items():
        targets = [name.removesuffix(".weight") for name in diffusers_names(f"{module}.weight")]
        if b.shape[0] % len(targets):
            raise ValueError(f"LoRA {module!r}: B rows {b.shape[0]} do not split into {len(targets)} (q, k, v)")
        a_file = convert(a, dtype)  # q, k and v share A: one tensor, written under each name
        for target, b_part in zip(targets, b.chunk(len(targets), dim=0)):
            key = FILE_PREFIX + target
            tensors[f"{key}.lora_A.weight"] = a_file
            tensors[f"{key}.lora_B.weight"] = convert(b_part, dtype)
            tensors[f"{key}.alpha"] = alpha.clone()
    return tensors


def _file_metadata(settings: LoraSettings, dtype: torch.dtype, extra: dict[str, str] | None) -> dict[str, str]:
    extra = dict(extra or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"LoRA metadata must map str to str; got {key!r}: {value!r} (convert with str())")
        if key in RESERVED_METADATA:
            raise ValueError(f"LoRA metadata key {key!r} is written from the settings; remove it from metadata")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base_model": "Z-Image",
        "adapter": settings.adapter,
        "rank": str(settings.rank),
        "alpha": repr(settings.effective_alpha),
        "dropout": repr(settings.dropout),
        "targets": settings.targets,
        "dtype": SAVE_DTYPES[dtype],
        **extra,
    }


@dataclass(frozen=True)
class StagedLoraFile:
    """An adapter file's bytes-to-be, held in CPU memory (copies: training may change the weights meanwhile); final
    once ``ready`` returns (copies still in flight when the caller's ``copy_to_host`` queued them)."""

    tensors: dict[str, torch.Tensor]
    header: dict[str, str]
    ready: Callable[[], None] = lambda: None

    def write(self, path: str | os.PathLike) -> None:
        self.ready()
        # our writer keeps key and metadata order, so the same LoRA always gives the same bytes (safetensors' does not)
        write_safetensors(Path(path), sorted(self.tensors.items()), dict(sorted(self.header.items())))
        logger.info("saved LoRA (%d tensors, %s) to %s", len(self.tensors), self.header["dtype"], path)


def stage_lora_file(
    state: dict[str, torch.Tensor],
    settings: LoraSettings,
    *,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    copy_to_host: Callable | None = None,
) -> StagedLoraFile:
    """``save_lora_file``'s first half: the file's tensors copied to CPU in ``dtype`` and its header, validated; the
    write (`StagedLoraFile.write`) may then run in another thread. ``copy_to_host`` (a LoRA's tensors, cast on their
    device, as (name, tensor) pairs → an object with ``tensors`` and ``wait()``, as ``HostStaging.copy`` gives)
    replaces the blocking copy of each tensor."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"LoRA file dtype must be one of {list(SAVE_DTYPES.values())}, got {dtype}")
    header = _file_metadata(settings, dtype, metadata)
    if copy_to_host is None or settings.adapter != "lora":
        return StagedLoraFile(_file_tensors(state, settings, dtype), header)
    copies = copy_to_host(lora_file_tensors_on_device(state, settings, dtype))
    return StagedLoraFile(dict(copies.tensors), header, copies.wait)


def lora_file_tensors_on_device(state: dict[str, torch.Tensor], settings: LoraSettings, dtype=torch.bfloat16):
    """(name, tensor) pairs of a LoRA file's tensors as `stage_lora_file` hands them to ``copy_to_host``."""
    if settings.adapter != "lora":
        raise ValueError(f"only a LoRA's file tensors are cast in place, not a {settings.adapter}'s")
    return list(_file_tensors(state, settings, dtype, convert=cast_in_place).items())


def save_lora_file(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    settings: LoraSettings,
    *,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Write ``state`` (our names, from ``lora.adapter_file_state``) atomically as a ComfyUI-loadable adapter file
    (LoRA here; DoRA, LoKr and LoHa in ``adapter_file``'s form, by ``settings.adapter``).

    ``metadata`` adds str→str header entries such as ``{"steps": "1200", "dataset_hash": "…"}``."""
    stage_lora_file(state, settings, metadata=metadata, dtype=dtype).write(path)


# ---- reading any ComfyUI-style Z-Image LoRA -------------------------------------------------------------------------


def _read(source: str | os.PathLike | dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    if isinstance(source, dict):
        return source, {}, "<state dict>"
    with safe_open(os.fspath(source), framework="pt", device="cpu") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata() or {}
    return tensors, metadata, os.fspath(source)


def _group_modules(tensors: dict[str, torch.Tensor], origin: str) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """File keys → file module name (prefix stripped) → {"down"|"up"|"alpha": (key, tensor)}."""
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = defaultdict(dict)
    unknown = []
    for key, tensor in tensors.items():
        prefix = next((p for p in ACCEPTED_PREFIXES if key.startswith(p)), None)
        ending = next((e for e in _ENDINGS if key.endswith(e)), None)
        if prefix is None or ending is None:
            unknown.append(key)
            continue
        parts = modules[key[len(prefix) : -len(ending)]]
        if _ENDINGS[ending] in parts:
            raise ValueError(f"{origin}: keys {parts[_ENDINGS[ending]][0]!r} and {key!r} are the same LoRA tensor")
        parts[_ENDINGS[ending]] = (key, tensor)
    if unknown:
        raise ValueError(
            f"{origin}: {len(unknown)} keys are not plain LoRA tensors under {list(ACCEPTED_PREFIXES)} "
            f"(LoHa/LoKr/DoRA/diff patches and other prefixes are not supported): {sorted(unknown)[:5]}"
        )
    for module, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise ValueError(f"{origin}: LoRA module {module!r} has {sorted(parts)}; it needs both down (A) and up (B)")
        down, up = parts["down"][1], parts["up"][1]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{origin}: LoRA module {module!r} has A {tuple(down.shape)} and B {tuple(up.shape)}; "
                "expected A [rank, in] and B [out, rank]"
            )
    return modules


def _alpha(parts: dict[str, tuple[str, torch.Tensor]]) -> float:
    rank = parts["down"][1].shape[0]
    return float(parts["alpha"][1].float().item()) if "alpha" in parts else float(rank)


def comfy_deltas(source: str | os.PathLike | dict[str, torch.Tensor]) -> dict[str, list[RowDelta]]:
    """Our weight name → the row-slice deltas a ComfyUI-style LoRA adds to it, computed as ComfyUI does:
    ``(alpha / rank) · up @ down`` in float32 (alpha missing: scale 1). to_q/to_k/to_v land at row offsets
    0/d/2d of the fused ``attention.qkv.weight``; other diffusers names map one-to-one (``layouts.comfy_name``)."""
    tensors, _, origin = _read(source)
    deltas: dict[str, list[RowDelta]] = defaultdict(list)
    for module, parts in _group_modules(tensors, origin).items():
        down, up = parts["down"][1], parts["up"][1]
        scale = _alpha(parts) / down.shape[0]
        target, third = comfy_name(f"{module}.weight")
        keys = tuple(key for key, _ in parts.values())
        offset = 0 if third is None else third * up.shape[0]
        deltas[target].append(RowDelta(row_offset=offset, delta=scale * (up.float() @ down.float()), keys=keys))
    return dict(deltas)


def _model_weight(params: dict[str, torch.nn.Parameter], name: str) -> torch.nn.Parameter | None:
    """Our weight name → the model's parameter, also when peft has wrapped the module (``.base_layer.weight``)."""
    if name in params:
        return params[name]
    module, _, leaf = name.rpartition(".")
    return params.get(f"{module}.base_layer.{leaf}")


def merge_lora_file_into(
    model: torch.nn.Module, path: str | os.PathLike, strength: float = 1.0, *, strict: bool = True
) -> int:
    """Add ``strength`` × a ComfyUI-style Z-Image LoRA file to the model's weights (float32 math, cast back).

    Returns the number of file keys that match no model weight; with ``strict`` any such key raises instead."""
    tensors, _, origin = _read(path)
    adapter = adapter_file.detect_adapter(tensors)
    if adapter != "lora":
        return _merge_adapter_file(model, tensors, adapter, strength, strict=strict, origin=origin)
    deltas = comfy_deltas(tensors)
    params = dict(model.named_parameters())
    missing = [rows for name, rows in deltas.items() if _model_weight(params, name) is None]
    unmatched = sorted(key for rows in missing for row in rows for key in row.keys)
    if unmatched and strict:
        raise ValueError(
            f"{os.fspath(path)}: {len(unmatched)} LoRA keys match no weight of the model (not a Z-Image LoRA, or "
            f"a different model size?); first: {unmatched[:5]}"
        )
    with torch.no_grad():
        for name, rows in deltas.items():
            weight = _model_weight(params, name)
            if weight is None:
                continue
            for row in rows:
                _add_rows(weight, row, strength, name, path)
    if unmatched:
        logger.warning("%s: %d LoRA keys not loaded: %s", os.fspath(path), len(unmatched), unmatched[:5])
    logger.info("merged LoRA %s at strength %g into %d weights", os.fspath(path), strength, len(deltas))
    return len(unmatched)


def _merge_adapter_file(model, tensors: dict, adapter: str, strength: float, *, strict: bool, origin: str) -> int:
    """A DoRA/LoKr/LoHa file patched into the model's weights per file module, as ComfyUI 0.8 does (float32)."""
    params = dict(model.named_parameters())
    modules = adapter_file.group_file(tensors, adapter, ACCEPTED_PREFIXES, origin)
    unmatched = []
    with torch.no_grad():
        for module, parts in modules.items():
            name, third = comfy_name(f"{module}.weight")
            weight = _model_weight(params, name)
            if weight is None:
                unmatched.append(module)
                continue
            rows = weight.shape[0] // 3 if third is not None else weight.shape[0]
            target = weight.narrow(0, (third or 0) * rows, rows)
            target.copy_(adapter_file.comfy_patch(target.float(), adapter, parts, strength).to(weight.dtype))
    if unmatched and strict:
        raise ValueError(f"{origin}: {len(unmatched)} {adapter} modules match no weight of the model: {unmatched[:5]}")
    if unmatched:
        logger.warning("%s: %d %s modules not loaded: %s", origin, len(unmatched), adapter, unmatched[:5])
    logger.info("merged %s %s at strength %g into %d weights", adapter, origin, strength, len(modules))
    return len(unmatched)


def _add_rows(weight: torch.Tensor, row: RowDelta, strength: float, name: str, path) -> None:
    rows, cols = row.delta.shape
    if weight.ndim != 2 or cols != weight.shape[1] or row.row_offset + rows > weight.shape[0]:
        raise ValueError(
            f"{os.fspath(path)}: LoRA {row.keys[0]} gives a [{rows}, {cols}] delta at row {row.row_offset}, which "
            f"does not fit {name} {tuple(weight.shape)} (LoRA for a different model size?)"
        )
    target = weight.narrow(0, row.row_offset, rows)
    target.copy_((target.float() + strength * row.delta.to(target.device)).to(weight.dtype))


# ---- loading our files back (resume) --------------------------------------------------------------------------------


def _fuse(module: str, parts: list[tuple[int | None, dict]], origin: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One of our modules from its file module(s): (A, B, alpha); to_q/to_k/to_v must share A and alpha."""
    if len(parts) == 1 and parts[0][0] is None:
        only = parts[0][1]
        return only["down"][1], only["up"][1], _alpha(only)
    thirds = dict(parts)
    if sorted(thirds, key=str) != [0, 1, 2]:
        raise ValueError(f"{origin}: {module} needs exactly to_q, to_k and to_v LoRAs to rebuild the fused qkv")
    ordered = [thirds[i] for i in range(3)]
    downs = [p["down"][1] for p in ordered]
    alphas = {_alpha(p) for p in ordered}
    if not all(torch.equal(downs[0], d) for d in downs[1:]) or len(alphas) != 1:
        raise ValueError(
            f"{origin}: to_q/to_k/to_v of {module} have different lora_A (or alpha), so they cannot be fused into "
            "one qkv LoRA for resuming (file from another trainer?). Use merge_lora_file_into() to merge it instead."
        )
    return downs[0], torch.cat([p["up"][1] for p in ordered]), alphas.pop()


def load_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA (or DoRA/LoKr/LoHa) file back into our names (fused qkv reassembled) with the settings it was
    trained with. A DoRA file's state holds ``dora_scale``: ``load_lora_state_dict`` turns it back into the magnitude
    from the base the model carries."""
    tensors, metadata, origin = _read(path)
    adapter = adapter_file.detect_adapter(tensors)
    if adapter != "lora":
        return _load_adapter_file(tensors, metadata, adapter, origin)
    grouped: dict[str, list[tuple[int | None, dict]]] = defaultdict(list)
    for module, parts in _group_modules(tensors, origin).items():
        target, third = comfy_name(f"{module}.weight")
        grouped[target.removesuffix(".weight")].append((third, parts))
    state, ranks, alphas = {}, set(), set()
    for module, parts in grouped.items():
        a, b, alpha = _fuse(module, parts, origin)
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, b
        ranks.add(a.shape[0])
        alphas.add(alpha)
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(
            f"{origin}: modules have ranks {sorted(ranks)} and alphas {sorted(alphas)}; one of each needed"
        )
    rank, alpha = ranks.pop(), alphas.pop()
    if "rank" in metadata and int(metadata["rank"]) != rank:
        raise ValueError(f"{origin}: metadata says rank {metadata['rank']} but the tensors have rank {rank}")
    targets = metadata.get("targets")
    if targets not in TARGET_PRESETS:
        targets = infer_targets(list(grouped))
    dropout = float(metadata.get("dropout", 0.0))
    settings = LoraSettings(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    return LoraFile(state=state, settings=settings, metadata=dict(metadata))


def _load_adapter_file(tensors: dict, metadata: dict[str, str], adapter: str, origin: str) -> LoraFile:
    modules = adapter_file.group_file(tensors, adapter, ACCEPTED_PREFIXES, origin)
    state, ranks, alphas = adapter_file.fuse_file(modules, adapter, metadata, origin)
    rank = int(metadata["rank"]) if "rank" in metadata else None
    alpha = float(metadata["alpha"]) if "alpha" in metadata else None
    ranks.discard(None)
    alphas.discard(None)
    if rank is None and len(ranks) == 1:
        rank = ranks.pop()
    if rank is None or (ranks and ranks != {rank}):
        raise ValueError(f"{origin}: {adapter} modules have ranks {sorted(ranks)} (metadata rank: {rank}); one needed")
    if alpha is None:
        alpha = alphas.pop() if len(alphas) == 1 else float(rank)
    elif alphas and alphas != {alpha}:
        raise ValueError(f"{origin}: metadata alpha {alpha} but the tensors carry alphas {sorted(alphas)}")
    targets = metadata.get("targets")
    if targets not in TARGET_PRESETS:
        targets = infer_targets(sorted({key.rsplit(".", 2)[0] for key in state}))
    dropout = float(metadata.get("dropout", 0.0))
    settings = LoraSettings(rank=rank, alpha=alpha, dropout=dropout, targets=targets, adapter=adapter)
    if adapter == "lokr":
        adapter_file.unfold_lokr_scale(state, settings.scale)
    return LoraFile(state=state, settings=settings, metadata=dict(metadata))
