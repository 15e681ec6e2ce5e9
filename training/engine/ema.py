"""EMA of the trained weights (LoRA adapters or the whole model): an fp32 shadow of every trainable parameter, on
the device or in host RAM as the plan placed it, saved beside the raw result in the same format and resumed exactly
(its tensors are part of the checkpoint).

After optimizer step ``s`` (counted from 1): while ``s <= start_step`` the shadow follows the weights exactly; after,
``shadow = decay * shadow + (1 - decay) * weights``. Under FSDP2 each rank keeps the shadow of its own shards.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from .config import EmaSection
from .parallelize import clean_name

logger = logging.getLogger(__name__)
SUFFIX = "_ema"  # lora.safetensors -> lora_ema.safetensors, beside it


def ema_path(result: Path) -> Path:
    """Where the EMA twin of a result file goes: the same folder, ``<stem>_ema<suffix>``."""
    return result.with_name(f"{result.stem}{SUFFIX}{result.suffix}")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class WeightAverage:
    """The shadow weights, keyed by parameter name (as ``named_parameters`` gives them)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], section: EmaSection, *, device: torch.device) -> None:
        if section.placement == "off":
            raise ValueError("WeightAverage needs ema.placement 'device' or 'cpu', got 'off'")
        self.section = section
        self.params = dict(named)
        where = torch.device("cpu") if section.placement == "cpu" else device
        with torch.no_grad():
            self.shadow = {name: _local(param).detach().to(where, torch.float32, copy=True) for name, param in named}
        count = sum(t.numel() for t in self.shadow.values())
        logger.info(
            "EMA of %d trained weights in float32 on %s (%.2f GiB): decay %g, following the weights until step %d",
            count, where, count * 4 / 2**30, section.decay, section.start_step,
        )  # fmt: skip

    @classmethod
    def create(cls, model: nn.Module, section: EmaSection, *, device: torch.device) -> WeightAverage | None:
        if section.placement == "off":
            return None
        named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        return cls(named, section, device=device)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step`` (1-based)."""
        follow = step <= self.section.start_step
        for name, shadow in self.shadow.items():
            value = _local(self.params[name]).detach()
            if value.device != shadow.device:
                value = value.to(shadow.device, non_blocking=False)
            if follow:
                shadow.copy_(value)
            else:
                shadow.lerp_(value.float(), 1.0 - self.section.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors the checkpoint saves and restores in place."""
        return self.shadow

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the parameters hold the EMA weights (in their own dtype), so the usual save path writes the EMA
        file in the same format; after, the trained weights are put back bit for bit."""
        kept = {name: _local(param).detach().clone() for name, param in self.params.items()}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    _local(param).copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    _local(param).copy_(kept[name])
