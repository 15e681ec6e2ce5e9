"""Random cached-input batches (latents + caption features) made on the device: benchmarks and tests.

Sample i of the run is a pure function of (seed, i), and a rank's micro-batch holds the global sample indices
``global_sample_indices`` gives it, so the global batch of a step is the same set of samples on 1 or N processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..data.batches import Batch
from ..model.config import ZImageConfig
from .objective import sample_generator

logger = logging.getLogger(__name__)

LATENT_DOWNSCALE = 8  # the Flux VAE: 8× smaller than the image
EMPTY_CAPTION_TOKENS = 8  # about as long as the chat template around an empty prompt
_SALT_LATENT = 0x1A7E_0001
_SALT_CAPTION = 0xCA9_0002
_SALT_EMPTY = 0xE3_0003


def global_sample_indices(
    step: int, micro_step: int, *, rank: int, world_size: int, micro_batch: int, grad_accum: int
) -> list[int]:
    """Global indices of the samples in (step, micro-step) on ``rank``.

    The micro-step m of a step covers samples [m·W·b, (m+1)·W·b) of the step's global batch, rank r holding the r-th
    slice of b: one process with micro-batch W·b sees exactly what W processes with micro-batch b see together.
    """
    global_batch = micro_batch * grad_accum * world_size
    first = step * global_batch + (micro_step * world_size + rank) * micro_batch
    return list(range(first, first + micro_batch))


@dataclass(kw_only=True)
class SyntheticBatches:
    """An endless iterator of micro-batches; ``state_dict`` is the count of micro-batches handed out."""

    model_config: ZImageConfig
    resolution: int
    caption_tokens: int
    micro_batch: int
    grad_accum: int
    rank: int
    world_size: int
    seed: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    consumed: int = field(default=0)

    def __post_init__(self):
        if self.resolution % (LATENT_DOWNSCALE * self.model_config.patch_size):
            raise ValueError(
                f"synthetic resolution {self.resolution} must be a multiple of "
                f"{LATENT_DOWNSCALE * self.model_config.patch_size} (VAE downscale × patch size)"
            )
        if self.caption_tokens < 1:
            raise ValueError(f"synthetic caption_tokens must be >= 1, got {self.caption_tokens}")
        logger.info(
            "synthetic data: %d² images (%d² latents), %d caption tokens, micro-batch %d",
            self.resolution,
            self.resolution // LATENT_DOWNSCALE,
            self.caption_tokens,
            self.micro_batch,
        )

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        step, micro_step = divmod(self.consumed, self.grad_accum)
        indices = global_sample_indices(
            step,
            micro_step,
            rank=self.rank,
            world_size=self.world_size,
            micro_batch=self.micro_batch,
            grad_accum=self.grad_accum,
        )
        self.consumed += 1
        return self.make_batch(indices)

    def make_batch(self, indices: list[int]) -> Batch:
        size = self.resolution // LATENT_DOWNSCALE
        channels, dim = self.model_config.in_channels, self.model_config.cap_feat_dim
        latents, captions = [], []
        for index in indices:
            generator = sample_generator(self.seed, index, _SALT_LATENT, self.device)
            latents.append(torch.randn(channels, size, size, generator=generator, device=self.device))
            generator = sample_generator(self.seed, index, _SALT_CAPTION, self.device)
            captions.append(torch.randn(self.caption_tokens, dim, generator=generator, device=self.device))
        count = len(indices)
        return Batch(
            keys=[f"synthetic-{index}" for index in indices],
            captions=[""] * count,
            size=(self.resolution, self.resolution),
            latents=torch.stack(latents).to(self.dtype),
            caption_features=torch.stack(captions).to(self.dtype),
            caption_lengths=torch.full((count,), self.caption_tokens, dtype=torch.long, device=self.device),
            caption_mask=torch.ones(count, self.caption_tokens, dtype=torch.bool, device=self.device),
        )

    def empty_caption(self) -> torch.Tensor:
        """A fixed random stand-in for the text encoder's features of "" [8, cap_feat_dim]."""
        generator = sample_generator(self.seed, 0, _SALT_EMPTY, self.device)
        shape = (EMPTY_CAPTION_TOKENS, self.model_config.cap_feat_dim)
        return torch.randn(shape, generator=generator, device=self.device).to(self.dtype)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])
