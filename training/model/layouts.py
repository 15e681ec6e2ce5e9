"""Name mapping between our parameter names (ComfyUI single-file layout) and diffusers' layout.

ComfyUI / original single-file: fused ``attention.qkv`` (rows q|k|v), ``attention.out``, ``q_norm``/``k_norm``,
``x_embedder``, ``final_layer``; full checkpoints prefix every key with ``model.diffusion_model.``.
Diffusers: ``to_q``/``to_k``/``to_v``, ``to_out.0``, ``norm_q``/``norm_k``, ``all_x_embedder.2-1``,
``all_final_layer.2-1``. Everything else is named alike.
"""

from __future__ import annotations

import re

COMFY_CHECKPOINT_PREFIX = "model.diffusion_model."
QKV_PARTS = ("to_q", "to_k", "to_v")

_RENAMES_TO_DIFFUSERS = (
    (re.compile(r"^x_embedder\."), "all_x_embedder.2-1."),
    (re.compile(r"^final_layer\."), "all_final_layer.2-1."),
    (re.compile(r"\.attention\.out\."), ".attention.to_out.0."),
    (re.compile(r"\.attention\.q_norm\."), ".attention.norm_q."),
    (re.compile(r"\.attention\.k_norm\."), ".attention.norm_k."),
)
_RENAMES_TO_COMFY = (
    (re.compile(r"^all_x_embedder\.2-1\."), "x_embedder."),
    (re.compile(r"^all_final_layer\.2-1\."), "final_layer."),
    (re.compile(r"\.attention\.to_out\.0\."), ".attention.out."),
    (re.compile(r"\.attention\.norm_q\."), ".attention.q_norm."),
    (re.compile(r"\.attention\.norm_k\."), ".attention.k_norm."),
)
_DIFFUSERS_QKV = re.compile(r"^(?P<block>.+\.attention)\.to_(?P<part>[qkv])\.(?P<leaf>weight|bias)$")


def _apply(renames, name: str) -> str:
    for pattern, replacement in renames:
        name = pattern.sub(replacement, name)
    return name


def diffusers_names(name: str) -> list[str]:
    """Our parameter name → the diffusers name(s) holding it (fused qkv maps to three, in row order)."""
    if name.endswith(".attention.qkv.weight"):
        block = name[: -len(".qkv.weight")]
        return [f"{block}.{part}.weight" for part in QKV_PARTS]
    return [_apply(_RENAMES_TO_DIFFUSERS, name)]


def comfy_name(diffusers_name: str) -> tuple[str, int | None]:
    """A diffusers name → (our name, index of the q/k/v third it fills, or None)."""
    match = _DIFFUSERS_QKV.match(diffusers_name)
    if match:
        return f"{match['block']}.qkv.{match['leaf']}", "qkv".index(match["part"])
    return _apply(_RENAMES_TO_COMFY, diffusers_name), None


def strip_comfy_prefix(name: str) -> str:
    return name[len(COMFY_CHECKPOINT_PREFIX) :] if name.startswith(COMFY_CHECKPOINT_PREFIX) else name


def is_diffusers_layout(names) -> bool:
    return any(_DIFFUSERS_QKV.match(n) or n.startswith("all_x_embedder.") for n in names)
