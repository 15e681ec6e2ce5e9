"""Reading encoder weights (the VAE, the text encoder) from ComfyUI's safetensors files, one tensor at a time.

The same streaming reader as the transformer's (training/model/safetensors_io.py): headers parsed by hand, each
tensor read into its final storage, pickle files refused. Also the device choice shared by the packing encoders.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from .safetensors_io import DTYPES, TensorSource, WeightsError, read_into, read_sources
from .weights import resolve_files

logger = logging.getLogger(__name__)

_SAMPLED_ELEMENTS = 4096


def read_file_sources(path: str | Path, what: str) -> dict[str, TensorSource]:
    """Tensor name -> where it lies, for one safetensors file (pickle checkpoints refused with a clear message)."""
    files = resolve_files(path)
    if len(files) != 1:
        raise WeightsError(f"{what} {path}: expected one .safetensors file, found {len(files)}")
    return read_sources(files[0])


def load_tensors(
    sources: dict[str, TensorSource], names: dict[str, str], *, device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """{our name: tensor} for {our name: file key}; dtype None keeps each tensor's file dtype."""
    state = {}
    handles = {}
    try:
        for ours, key in names.items():
            source = sources[key]
            if source.file not in handles:
                handles[source.file] = open(source.file, "rb")
            target = torch.empty(source.shape, dtype=dtype or DTYPES[source.dtype])
            read_into(handles[source.file], source, target)
            state[ours] = target.to(device)
    finally:
        for handle in handles.values():
            handle.close()
    return state


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Names, shapes, dtypes and the first elements of every tensor: tells different weight files apart cheaply."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        sample = tensor.detach().flatten()[:_SAMPLED_ELEMENTS].to("cpu", torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def pick_device(requested: str) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu (logged); 'cuda' without a GPU is refused. Under torchrun
    (LOCAL_RANK set) cuda means this rank's GPU, so one encoder per rank can each use its own."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device={requested!r} must be 'auto', 'cuda' or 'cpu'")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info(
            "encoding on %s (device auto: %s)", requested, "a GPU is visible" if requested == "cuda" else "no GPU"
        )
    elif requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU; use --device cpu (slow) or auto")
    if requested == "cuda" and os.environ.get("LOCAL_RANK"):
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(requested)
