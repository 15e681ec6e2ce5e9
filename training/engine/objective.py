"""Z-Image's flow-matching objective exactly as ComfyUI samples it (docs/zimage.md §7).

x_σ = σ·ε + (1−σ)·x0; the network gets σ (it computes t = 1−σ itself) and its raw output is trained toward x0 − ε with
a float32 mean-squared error over all elements.

σ samplers and loss weights (docs/training.md has the formulas' sources and the per-variant defaults):
- ``uniform`` σ = u; ``shifted_uniform`` σ = shift(u) (ComfyUI's time shift; the default, shift 3 as ComfyUI
  samples Z-Image); ``logit_normal`` σ = sigmoid(m + s·n) (SD3 §3.1); ``shifted_logit_normal`` its shifted form (musubi
  "shift", flux training); ``mode`` SD3's mode sampling with heavy tails; ``cosmap`` SD3's CosMap.
- The shifted samplers' shift: ``fixed`` (objective.shift), ``flux`` (exp of μ linear in the image token count,
  0.5 at 256 tokens and 1.15 at 4096: diffusers' calculate_shift) or ``sd3`` (objective.shift at 1024² times
  √(tokens / 4096), SD3 §5.3.2's resolution-dependent shift).
- Loss weights w(σ) as diffusers' compute_loss_weighting_for_sd3 (none, sigma_sqrt, cosmap) and the logit-normal
  density (the weighting that equals logit-normal sampling under uniform σ, SD3 §3.1).

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
from ..vocabulary import LOSS_WEIGHTINGS, SHIFT_RULES, SHIFTED_SAMPLERS, SIGMA_SAMPLERS

#: flux's resolution-dependent shift (diffusers calculate_shift): μ linear in image tokens between these points
FLUX_SHIFT_POINTS = ((256, 0.5), (4096, 1.15))
SD3_REFERENCE_TOKENS = 4096  # 1024² px: (1024 / 8 / 2)² patches
_DENSITY_EPS = 1e-5  # σ is kept this far from 0 and 1 where a weight divides by σ or 1 − σ
_SALT_OBJECTIVE = 0x5EED_0B1E
_MIX = 0x9E37_79B9_7F4A_7C15


def sample_generator(seed: int, sample_index: int, salt: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on (seed, sample index, salt)."""
    value = (seed * _MIX + sample_index * 0xBF58_476D_1CE4_E5B9 + salt) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(value)


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """ComfyUI's time shift: σ = shift·u / (1 + (shift − 1)·u)."""
    return shift * u / (1 + (shift - 1) * u)


def image_tokens(latent_shape: tuple[int, ...]) -> int:
    """Image tokens of a latent [C, H, W] (2×2 patches, odd sides padded as the model does)."""
    height, width = latent_shape[-2:]
    return -(-height // 2) * -(-width // 2)


def rule_shift(rule: str, shift: float, tokens: int) -> float:
    """The time shift for an image of ``tokens`` tokens under a shift rule."""
    if rule == "fixed":
        return shift
    if rule == "flux":
        (x0, y0), (x1, y1) = FLUX_SHIFT_POINTS
        return math.exp(y0 + (y1 - y0) * (tokens - x0) / (x1 - x0))
    if rule == "sd3":
        return shift * math.sqrt(tokens / SD3_REFERENCE_TOKENS)
    raise ValueError(f"shift rule must be one of {SHIFT_RULES}, got {rule!r}")


def mode_sigma(u: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3's mode sampling (diffusers compute_density_for_timestep_sampling 'mode')."""
    return 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def cosmap_sigma(u: torch.Tensor) -> torch.Tensor:
    """SD3's CosMap: σ = 1 − 1 / (tan(πu/2) + 1)."""
    return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)


def loss_weights(weighting: str, sigma: torch.Tensor, logit_mean: float = 0.0, logit_std: float = 1.0):
    """w(σ) per sample (float32): diffusers' compute_loss_weighting_for_sd3, plus the logit-normal density."""
    if weighting == "none":
        return torch.ones_like(sigma)
    if weighting == "sigma_sqrt":
        return sigma.clamp(min=_DENSITY_EPS) ** -2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    if weighting == "logit_normal":
        s = sigma.clamp(_DENSITY_EPS, 1 - _DENSITY_EPS)
        z = (torch.log(s / (1 - s)) - logit_mean) / logit_std
        return torch.exp(-0.5 * z**2) / (logit_std * math.sqrt(2 * math.pi) * s * (1 - s))
    raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")


@dataclass(kw_only=True, frozen=True)
class FlowObjective:
    sampler: str = "shifted_uniform"
    shift: float = 3.0
    shift_rule: str = "fixed"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"
    caption_dropout: float = 0.0
    n_buckets: int = 4  # σ buckets over [0, 1] for the per-bucket loss metric
    seed: int = 0

    def __post_init__(self):
        if self.sampler not in SIGMA_SAMPLERS:
            raise ValueError(f"sigma sampler must be one of {SIGMA_SAMPLERS}, got {self.sampler!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0 (ComfyUI's Z-Image uses 3.0), got {self.shift!r}")
        if self.shift_rule not in SHIFT_RULES:
            raise ValueError(f"shift rule must be one of {SHIFT_RULES}, got {self.shift_rule!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if not -1.0 <= self.mode_scale <= 1.75:
            raise ValueError(f"mode_scale must be in [-1, 1.75] (monotone σ), got {self.mode_scale!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout!r}")
        if self.n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {self.n_buckets!r}")

    def shift_for(self, latent_shape: tuple[int, ...]) -> float:
        """The shifted samplers' shift for latents of this shape ([C, H, W]) under the shift rule."""
        if self.shift_rule == "fixed":
            return self.shift
        return rule_shift(self.shift_rule, self.shift, image_tokens(latent_shape))

    def sigma_from_uniform(self, u: torch.Tensor, normal: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        """σ from one uniform and one standard-normal draw per sample (each sampler uses one of them);
        ``shift``: the shifted samplers' shift (None: objective.shift)."""
        shift = self.shift if shift is None else shift
        if self.sampler == "shifted_uniform":
            return shift_sigma(u, shift)
        if self.sampler in ("logit_normal", "shifted_logit_normal"):
            sigma = torch.sigmoid(self.logit_mean + self.logit_std * normal)
            return shift_sigma(sigma, shift) if self.sampler in SHIFTED_SAMPLERS else sigma
        if self.sampler == "mode":
            return mode_sigma(u, self.mode_scale)
        if self.sampler == "cosmap":
            return cosmap_sigma(u)
        return u

    def draw(self, sample_index: list[int], latent_shape: tuple[int, ...], device: torch.device):
        """Per-sample σ [B], caption-dropout flags [B] (bool) and noise [B, *latent_shape], all float32.

        Every sampler consumes the same draws (3 uniforms, 1 normal, the noise), so changing the sampler changes σ
        only, and a run's noise and caption dropout stay the same."""
        shift = self.shift_for(latent_shape)
        sigmas, drops, noises = [], [], []
        for index in sample_index:
            generator = sample_generator(self.seed, index, _SALT_OBJECTIVE, device)
            draws = torch.rand(3, generator=generator, device=device)
            normal = torch.randn(1, generator=generator, device=device)
            sigmas.append(self.sigma_from_uniform(draws[:1], normal, shift))
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
        weights = loss_weights(self.loss_weighting, sigma, self.logit_mean, self.logit_std)
        loss = per_sample.mean() if self.loss_weighting == "none" else (weights * per_sample).mean()
        return LossOutput(loss=loss, per_sample=per_sample.detach(), sigma=sigma.detach())

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
    loss: torch.Tensor  # scalar float32: the mean over the micro-batch of w(σ) × each sample's mean squared error
    per_sample: torch.Tensor  # [B], detached, unweighted (the σ-bucket metrics compare across weightings)
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


def expected_sigma_quantile(objective: FlowObjective, q: float, shift: float | None = None) -> float:
    """The q-quantile of σ under the objective's sampler (for tests and documentation); ``shift`` as in
    ``sigma_from_uniform``. Every σ map is monotone in its draw: increasing, except mode's (decreasing)."""
    shift = objective.shift if shift is None else shift
    if objective.sampler in ("logit_normal", "shifted_logit_normal"):
        z = math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1, dtype=torch.float64)).item()
        sigma = 1 / (1 + math.exp(-(objective.logit_mean + objective.logit_std * z)))
        return float(shift_sigma(torch.tensor(sigma), shift)) if objective.sampler in SHIFTED_SAMPLERS else sigma
    u = torch.tensor(1 - q if objective.sampler == "mode" else q, dtype=torch.float64)
    return float(objective.sigma_from_uniform(u, torch.zeros(()), shift))
