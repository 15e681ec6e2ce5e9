"""A LoRA extracted from a full fine-tune: each targeted linear's weight change, truncated to ``rank`` by SVD
(the best rank-r approximation in the Frobenius norm), saved as a ComfyUI LoRA file (``lora_file.save_lora_file``).

B = U_r S_r, A = V_r^T with alpha = rank (scale 1), so that B @ A is the truncated change; the fused qkv is one
module (one A, B stacked q|k|v), as the engine's LoRA is."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .lora import LoraSettings
from .lora_file import save_lora_file
from .targets import target_preset
from .weights import stream_tensors, tensor_shapes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Extracted:
    """The LoRA state (our names) and, per module, the relative Frobenius error of B @ A against the change."""

    state: dict[str, torch.Tensor]
    errors: dict[str, float]

    @property
    def mean_error(self) -> float:
        return sum(self.errors.values()) / len(self.errors)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B [out, r], relative error) of the best rank-``rank`` approximation of ``delta`` (float32)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, s.numel())
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    total = float(s.square().sum())
    error = float(s[rank:].square().sum() / total) ** 0.5 if total > 0 else 0.0
    return a.contiguous(), b.contiguous(), error


def targeted(name: str, targets: str) -> str | None:
    """The LoRA module a weight name belongs to under ``targets`` (``layers.0.attention.qkv``), else None."""
    if not name.endswith(".weight"):
        return None
    module = name.removesuffix(".weight")
    group, _, rest = module.partition(".")
    index, _, linear = rest.partition(".")
    preset = target_preset(targets)
    return module if index.isdigit() and group in preset.block_groups and linear in preset.modules else None


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike, *, rank: int, targets: str) -> Extracted:
    """The rank-``rank`` LoRA of ``tuned`` minus ``base`` (two transformer files of the same shape) on ``targets``."""
    settings = LoraSettings(rank=rank, targets=targets)  # validates rank and targets
    base_shapes, tuned_shapes = tensor_shapes(base), tensor_shapes(tuned)
    if base_shapes != tuned_shapes:
        raise ValueError(f"{tuned} is not a fine-tune of {base}: their tensors differ in names or shapes")
    modules = {name: m for name in base_shapes if (m := targeted(name, settings.targets)) is not None}
    if not modules:
        raise ValueError(f"no weight of {tuned} is targeted by LoRA targets {targets!r}")
    state, errors = {}, {}
    pairs = zip(stream_tensors(base, list(modules)), stream_tensors(tuned, list(modules)), strict=True)
    for (name, base_weight), (_, tuned_weight) in pairs:  # one weight of each file in memory at a time
        module = modules[name]
        a, b, errors[module] = low_rank(tuned_weight.float() - base_weight.float(), settings.rank)
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = a, b
    extracted = Extracted(state, errors)
    logger.info(
        "extracted a rank-%d LoRA of %d modules: mean relative error %.4f", rank, len(errors), extracted.mean_error
    )
    return extracted


def save_extracted(extracted: Extracted, path: str | os.PathLike, *, rank: int, targets: str, source: str) -> None:
    ranks = {t.shape[0] for k, t in extracted.state.items() if k.endswith("lora_A.weight")}
    if ranks != {rank}:  # a module narrower than the rank: the file holds one rank for every module
        raise ValueError(f"--rank {rank} exceeds the smallest targeted weight (rank {min(ranks)}): use at most that")
    metadata = {"extracted_from": source, "extraction_error": f"{extracted.mean_error:.6f}"}
    save_lora_file(path, extracted.state, LoraSettings(rank=rank, targets=targets), metadata=metadata)
