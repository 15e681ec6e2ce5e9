"""Our adapter files in a form diffusers 0.42.1's Z-Image pipeline loads exactly (``ZImagePipeline.load_lora_weights``).

Which form, per type (what diffusers accepts: docs/adapters.md):
    lora  the ComfyUI file itself (diffusers converts ``diffusion_model.*.lora_A/B`` + ``alpha``); written unchanged.
    lokr  the ComfyUI file itself: its q/k/v slices have a [d, d] linear's default Kronecker shape
          (``targets.lokr_decompose_factor``), which diffusers' ``_create_lokr_config`` re-derives; written unchanged.
    dora  diffusers drops ComfyUI's ``dora_scale``; it reads peft's own DoRA form, ``transformer.<module>.lora_A.weight``,
          ``.lora_B.weight`` (alpha / rank folded in: that form has no alpha) and ``.lora_magnitude_vector`` [out]
          (peft's m). m = dora_scale · ‖W + ΔW‖ / (‖W‖ + eps) per row (inverse of ``adapters.comfy_dora_scale``), W
          the base, so diffusers' DoRA computes the weight ComfyUI patches from the same file.
    loha  no loader of diffusers 0.42.1 reads ``hada_`` keys. (w1_a@w1_b) ⊙ (w2_a@w2_b) = U @ V with
          U[i, (a, b)] = w1_a[i, a]·w2_a[i, b] and V[(a, b), j] = w1_b[a, j]·w2_b[b, j] (face-splitting product), an
          exact LoRA of rank r², written in our LoRA file form (which ComfyUI loads too), float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import adapter_file
from .adapters import COMFY_NORM_EPS, DORA_SCALE
from .layouts import comfy_name
from .lora_file import ACCEPTED_PREFIXES, FILE_PREFIX, load_lora_file
from .safetensors_io import write_safetensors

logger = logging.getLogger(__name__)

#: diffusers' peft-form prefix (ZImageLoraLoaderMixin.transformer_name); a file under it with no ``alpha`` key is
#: passed to peft without conversion.
PEFT_PREFIX = "transformer."
MAGNITUDE = "lora_magnitude_vector"
#: Types whose ComfyUI file needs a conversion before diffusers loads it exactly.
CONVERTED = ("dora", "loha")
DIFFUSERS_SUFFIX = ".diffusers"

BaseWeights = Callable[[str], torch.Tensor]  # our weight name → the base weight (e.g. ``weights.stream_tensors``)


def diffusers_path(path: str | os.PathLike) -> Path:
    """Where the diffusers form of an adapter file goes by default: ``<stem>.diffusers.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}{DIFFUSERS_SUFFIX}{path.suffix}")


def _factor(parts: dict[str, torch.Tensor], rank: int) -> float:
    """ComfyUI's scale of one LoRA/DoRA/LoHa file module: alpha / rank, or 1 without an alpha key."""
    return float(parts["alpha"].float().item()) / rank if "alpha" in parts else 1.0


def loha_as_lora(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One LoHa file module → the equal LoRA {lora_A.weight [r², in], lora_B.weight [out, r²], alpha}."""
    f = {k: v.float() for k, v in parts.items() if k != "alpha"}
    rank = f["hada_w1_b"].shape[0]
    up = (f["hada_w1_a"].unsqueeze(2) * f["hada_w2_a"].unsqueeze(1)).flatten(1)  # [out, r·r]
    down = (f["hada_w1_b"].unsqueeze(1) * f["hada_w2_b"].unsqueeze(0)).flatten(0, 1)  # [r·r, in]
    alpha = torch.tensor(_factor(parts, rank) * rank * rank, dtype=torch.float32)
    return {"lora_A.weight": down.contiguous(), "lora_B.weight": up.contiguous(), "alpha": alpha}


def dora_as_peft(parts: dict[str, torch.Tensor], base: torch.Tensor) -> dict[str, torch.Tensor]:
    """One DoRA file module and its base rows (float32) → peft's {lora_A.weight, lora_B.weight, magnitude}."""
    a, b = parts["lora_A.weight"].float(), parts["lora_B.weight"].float()
    b = _factor(parts, a.shape[0]) * b
    weight = base.float()
    if weight.shape != (b.shape[0], a.shape[1]):
        raise ValueError(f"a DoRA of [{b.shape[0]}, {a.shape[1]}] does not fit its base {tuple(weight.shape)}")
    trained_norm = torch.linalg.norm(weight + b @ a, dim=1)
    scale = parts[DORA_SCALE].float().reshape(-1)
    magnitude = scale * trained_norm / (torch.linalg.norm(weight, dim=1) + COMFY_NORM_EPS)
    return {"lora_A.weight": a, "lora_B.weight": b, MAGNITUDE: magnitude}


def _dora_modules(modules: dict[str, dict], base: BaseWeights, origin: str) -> dict[str, torch.Tensor]:
    """DoRA file modules → peft-form tensors, reading each base weight once (q/k/v slices share the fused one)."""
    by_weight: dict[str, list[tuple[int | None, str]]] = {}
    for module in modules:
        name, third = comfy_name(f"{module}.weight")
        by_weight.setdefault(name, []).append((third, module))
    out = {}
    for name, slices in sorted(by_weight.items()):
        weight = base(name)
        rows = weight.shape[0] // 3 if len(slices) > 1 or slices[0][0] is not None else weight.shape[0]
        for third, module in slices:
            part = weight.narrow(0, (third or 0) * rows, rows)
            try:
                converted = dora_as_peft(modules[module], part)
            except ValueError as error:
                raise ValueError(f"{origin}: {module}: {error} (a DoRA for another model?)") from None
            out |= {f"{PEFT_PREFIX}{module}.{k}": v for k, v in converted.items()}
    return out


def diffusers_tensors(
    tensors: dict[str, torch.Tensor], *, base: BaseWeights | None = None, origin: str = "<state dict>"
) -> tuple[dict[str, torch.Tensor], str]:
    """A pack adapter file's tensors → (the tensors of its diffusers form, the adapter type). DoRA needs ``base``."""
    adapter = adapter_file.detect_adapter(tensors)
    if adapter not in CONVERTED:
        return dict(tensors), adapter
    modules = adapter_file.group_file(tensors, adapter, ACCEPTED_PREFIXES, origin)
    out: dict[str, torch.Tensor] = {}
    if adapter == "loha":
        for module, parts in sorted(modules.items()):
            out |= {f"{FILE_PREFIX}{module}.{k}": v for k, v in loha_as_lora(parts).items()}
        return out, adapter
    if base is None:
        raise ValueError(
            f"{origin}: a DoRA file's diffusers form needs the base model it was trained on (its magnitude is "
            "stored relative to the base weights); pass the base weights (CLI: --base)"
        )
    return _dora_modules(modules, base, origin), adapter


def export_diffusers(
    source: str | os.PathLike, out: str | os.PathLike | None = None, *, base: BaseWeights | None = None
) -> Path:
    """Write the diffusers form of the adapter file ``source`` (atomically) to ``out`` (default ``diffusers_path``);
    the header keeps the source's metadata plus ``diffusers_form``. Returns the path written."""
    source = Path(source)
    out = diffusers_path(source) if out is None else Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"{out}: the diffusers form must not overwrite its source; choose another --out")
    try:
        with safe_open(os.fspath(source), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except SafetensorError as error:
        raise ValueError(f"{source}: not a readable .safetensors adapter file ({error})") from None
    if adapter_file.detect_adapter(tensors) not in CONVERTED:
        load_lora_file(source)  # written unchanged: check it is one of our files first (names the problem if not)
    converted, adapter = diffusers_tensors(tensors, base=base, origin=os.fspath(source))
    form = {"lora": "as-is", "lokr": "as-is", "dora": "peft-dora", "loha": "lora-rank-r2"}[adapter]
    metadata["diffusers_form"] = form
    if adapter == "loha":  # the file is a LoRA now: its header says so (our LoRA reader checks rank against it)
        rank = next(t for k, t in converted.items() if k.endswith(".lora_A.weight")).shape[0]
        alpha = next(t for k, t in converted.items() if k.endswith(".alpha"))
        metadata |= {"adapter": "lora", "rank": str(rank), "alpha": repr(float(alpha.item()))}
    if adapter in CONVERTED:
        metadata["dtype"] = "float32"
    write_safetensors(out, sorted(converted.items()), dict(sorted(metadata.items())))
    logger.info("wrote the diffusers form (%s) of %s %s to %s", form, adapter, source, out)
    return out
