"""Z-Image's flow-matching objective exactly as ComfyUI samples it (docs/zimage.md §7).

x_σ = σ·ε + (1−σ)·x0; the network gets σ (it computes t = 1−σ itself) and its raw output is trained toward x0 − ε with
a float32 mean-squared error over all elements.

Every random draw of a sample (σ, caption dropout, noise) comes from a generator seeded by (seed, global sample index),
so a run gives the same numbers on 1 or N processes and after a resume, with no RNG state to save.

Empty caption: cached features cannot express "no caption" as zero tokens (the model pads a length-0 caption to 0
tokens, and a batch whose captions are all empty fails in the context refiner), and ComfyUI never feeds zero tokens
either: the empty prompt still runs through the chat template. Caption dropout therefore swaps in the text encoder's
features of "" — stored by the packer beside the shards — or, for synthetic data, a fixed random stand-in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import Batch

SIGMA_SAMPLERS = ("shifted_uniform", "logit_normal", "uniform")
_SALT_OBJECTIVE = 0x5EED_0B1E
_MIX = 0x9E37_79B9_7F4A_7C15


def sample_generator(seed: int, sample_index: int, salt: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on (seed, sample index, salt)."""
    value = (seed * _MIX + sample_index * 0xBF58_476D_1CE4_E5B9 + salt) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(value)


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """ComfyUI's time shift: σ = shift·u / (1 + (shift − 1)·u)."""
    return shift * u / (1 + (shift - 1) * u)


@dataclass(kw_only=True, frozen=True)
class FlowObjective:
    sampler: str = "shifted_uniform"
    shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    caption_dropout: float = 0.0
    n_buckets: int = 4  # σ buckets over [0, 1] for the per-bucket loss metric
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SIGMA_SAMPLERS:
            raise ValueError(f"sigma sampler must be one of {SIGMA_SAMPLERS}, got {self.sampler!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0 (ComfyUI's Z-Image uses 3.0), got {self.shift!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout!r}")
        if self.n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {self.n_buckets!r}")

    def sigma_from_uniform(self, u: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """σ from one uniform and one standard-normal draw per sample (each sampler uses one of them)."""
        if self.sampler == "shifted_uniform":
            return shift_sigma(u, self.shift)
        if self.sampler == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * normal)
        return u

    def draw(self, sample_index: list[int], latent_shape: tuple[int, ...], device: torch.device):
        """Per-sample σ [B], caption-dropout flags [B] (bool) and noise [B, *latent_shape], all float32."""
        sigmas, drops, noises = [], [], []
        for index in sample_index:
            generator = sample_generator(self.seed, index, _SALT_OBJECTIVE, device)
            draws = torch.rand(3, generator=generator, device=device)
            normal = torch.randn(1, generator=generator, device=device)
            sigmas.append(self.sigma_from_uniform(draws[:1], normal))
            drops.append(draws[1:2] < self.caption_dropout)
            noises.append(torch.randn(latent_shape, generator=generator, device=device))
        return torch.cat(sigmas), torch.cat(drops), torch.stack(noises)

    def loss(
        self, model: nn.Module, batch: Batch, sample_index: list[int], empty_caption: torch.Tensor | None
    ) -> LossOutput:
        """The loss of one micro-batch (a ``Batch`` with latents and caption features on the model's device)."""
        latents = batch.latents.float()
        if len(sample_index) != latents.shape[0]:
            raise ValueError(f"{len(sample_index)} sample indices for a batch of {latents.shape[0]}")
        sigma, drop, noise = self.draw(sample_index, tuple(latents.shape[1:]), latents.device)
        features, lengths = batch.caption_features, batch.caption_lengths
        if self.caption_dropout > 0:
            if empty_caption is None:
                raise ValueError("caption dropout needs the empty-caption features; set data.caption_dropout to 0")
            features, lengths = replace_captions(features, lengths, drop, empty_caption)
        s = sigma.view(-1, *([1] * (latents.ndim - 1)))
        noisy = s * noise + (1 - s) * latents
        prediction = model(noisy, sigma, features, lengths)
        target = latents - noise
        per_sample = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
        return LossOutput(loss=per_sample.mean(), per_sample=per_sample.detach(), sigma=sigma.detach())

    def bucket_stats(self, sigma: torch.Tensor, per_sample: torch.Tensor) -> torch.Tensor:
        """[2, n_buckets] float64: summed loss and sample count per σ bucket (sum over ranks, then divide)."""
        bucket = (sigma * self.n_buckets).long().clamp_(0, self.n_buckets - 1)
        stats = torch.zeros(2, self.n_buckets, dtype=torch.float64, device=sigma.device)
        stats[0].index_add_(0, bucket, per_sample.double())
        stats[1].index_add_(0, bucket, torch.ones_like(per_sample, dtype=torch.float64))
        return stats

    def bucket_names(self) -> list[str]:
        edges = [i / self.n_buckets for i in range(self.n_buckets + 1)]
        return [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(edges, edges[1:], strict=False)]

    def bucket_means(self, stats: torch.Tensor) -> dict[str, float | None]:
        """Bucket name → mean loss (None where no sample fell in the bucket this step)."""
        sums, counts = stats.tolist()
        return {n: (s / c if c else None) for n, s, c in zip(self.bucket_names(), sums, counts, strict=True)}


@dataclass(kw_only=True, frozen=True)
class LossOutput:
    loss: torch.Tensor  # scalar float32, the mean over every element of the micro-batch
    per_sample: torch.Tensor  # [B], detached
    sigma: torch.Tensor  # [B], detached


def replace_captions(
    features: torch.Tensor, lengths: torch.Tensor, drop: torch.Tensor, empty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Swap the captions of samples with ``drop`` set for ``empty`` [L0, D], without a host sync."""
    batch, length, dim = features.shape
    if empty.ndim != 2 or empty.shape[1] != dim:
        raise ValueError(f"empty-caption features have shape {tuple(empty.shape)}, expected [tokens, {dim}]")
    if empty.shape[0] > length:
        features = F.pad(features, (0, 0, 0, empty.shape[0] - length))
        length = empty.shape[0]
    padded_empty = F.pad(empty.to(features.device, features.dtype), (0, 0, 0, length - empty.shape[0]))
    features = torch.where(drop[:, None, None], padded_empty.expand(batch, -1, -1), features)
    lengths = torch.where(drop, torch.full_like(lengths, empty.shape[0]), lengths.to(drop.device))
    return features, lengths


def expected_sigma_quantile(objective: FlowObjective, q: float) -> float:
    """The q-quantile of σ under the objective's sampler (for tests and documentation)."""
    if objective.sampler == "shifted_uniform":
        return float(shift_sigma(torch.tensor(q), objective.shift))
    if objective.sampler == "logit_normal":
        z = math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1)).item()
        return 1 / (1 + math.exp(-(objective.logit_mean + objective.logit_std * z)))
    return q
