"""ComfyUI 0.8's KSampler for Z-Image, step for step: Euler, the 'simple' schedule, the flow shift, ComfyUI's cfg.

What ComfyUI does (comfy/ names are ComfyUI 0.8's files), reproduced here in the same float32 operations:

- Noise (comfy/sample.py ``prepare_noise``): ``torch.randn(shape)`` on the CPU in float32 from a CPU generator seeded
  with ``seed`` (ComfyUI seeds the global one with ``torch.manual_seed``; a fresh ``torch.Generator`` seeded the same
  way gives the same stream, and leaves every other stream alone).
- σ table (comfy/model_sampling.py ``ModelSamplingDiscreteFlow``, the model_sampling of ``ModelType.FLOW``, which
  ``model_base.Lumina2`` — Z-Image's base class — uses): 1000 σ = time_snr_shift(shift, t) for t = i/1000, i = 1..1000,
  shift from ``supported_models.ZImage.sampling_settings`` (3.0, multiplier 1.0: the DiT gets σ itself).
  ``ModelSamplingAuraFlow`` (shift, multiplier 1.0) builds the same table with another shift.
- 'simple' schedule (comfy/samplers.py ``simple_scheduler``): σ_table[-(1 + int(i · 1000/steps))] for i < steps, then 0.
- Start (``KSAMPLER.sample`` with an empty latent): x = σ_0·noise + (1 − σ_0)·0 (``CONST.noise_scaling``).
- Model (``BaseModel._apply_model`` + ``CONST.calculate_denoised``): denoised = x − σ·out with out = −(raw DiT output)
  (NextDiT returns ``-img``), i.e. x + σ·raw.
- CFG (``sampling_function`` / ``cfg_function``): cfg == 1 (math.isclose) runs the positive prompt only; otherwise
  denoised = uncond + (cond − uncond)·cfg on the denoised predictions (diffusers' guidance w is cfg − 1).
- Euler (comfy/k_diffusion/sampling.py ``sample_euler``, no churn): d = (x − denoised)/σ_i; x += d·(σ_{i+1} − σ_i).
- End: ``inverse_noise_scaling`` divides by 1 − σ_last = 1; the result is in the DiT's latent format (what
  ``KSAMPLER.sample`` returns before ``process_latent_out``), the format the packed shards and `FluxVAE.decode` use.
  ComfyUI's LATENT output is `to_comfy_latent` of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

#: comfy/supported_models.py ZImage.sampling_settings (shift 3.0, multiplier 1.0); ComfyUI 0.8 has one ZImage class.
COMFY_ZIMAGE_SHIFT = 3.0
SIGMA_TABLE_SIZE = 1000  # ModelSamplingDiscreteFlow's timesteps
#: comfy/latent_formats.py Flux (Z-Image's latent format)
FLUX_SCALE = 0.3611
FLUX_SHIFT = 0.1159


@dataclass(kw_only=True, frozen=True)
class SamplerSettings:
    """What a ComfyUI user sets on KSampler (sampler 'euler', scheduler 'simple', denoise 1) plus the model's shift."""

    steps: int = 8
    cfg: float = 1.0
    shift: float = COMFY_ZIMAGE_SHIFT
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= SIGMA_TABLE_SIZE:
            raise ValueError(f"sampler steps must be an integer in 1..{SIGMA_TABLE_SIZE}, got {self.steps!r}")
        if not (isinstance(self.cfg, (int, float)) and math.isfinite(self.cfg) and self.cfg > 0):
            raise ValueError(f"sampler cfg must be a finite number > 0 (1: no guidance), got {self.cfg!r}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"sampler shift must be a finite number > 0 (ComfyUI's Z-Image: 3.0), got {self.shift!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"sampler seed must be an integer in 0..2**64-1 (as ComfyUI's), got {self.seed!r}")

    @property
    def uses_guidance(self) -> bool:
        return not math.isclose(self.cfg, 1.0)


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """comfy/model_sampling.py time_snr_shift."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sigma_table(shift: float, multiplier: float = 1.0) -> torch.Tensor:
    """ModelSamplingDiscreteFlow.sigmas (float32, ascending), computed as ComfyUI computes it."""
    timesteps = (torch.arange(1, SIGMA_TABLE_SIZE + 1, 1) / SIGMA_TABLE_SIZE) * multiplier
    return time_snr_shift(shift, timesteps / multiplier)


def simple_sigmas(steps: int, shift: float) -> torch.Tensor:
    """comfy/samplers.py simple_scheduler: steps + 1 descending σ ending in 0 (float32)."""
    table = sigma_table(shift)
    stride = len(table) / steps
    sigmas = [float(table[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.FloatTensor([*sigmas, 0.0])


def comfy_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """comfy/sample.py prepare_noise for a latent of ``shape`` (float32, CPU), from a private generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")


def to_comfy_latent(latents: torch.Tensor) -> torch.Tensor:
    """The DiT's latent format -> ComfyUI's LATENT (latent_formats.Flux.process_out), what VAEDecode gets."""
    return latents / FLUX_SCALE + FLUX_SHIFT


def from_comfy_latent(latents: torch.Tensor) -> torch.Tensor:
    """ComfyUI's LATENT -> the DiT's latent format (latent_formats.Flux.process_in)."""
    return (latents - FLUX_SHIFT) * FLUX_SCALE


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B,C,H,W], σ [B]) -> denoised, float32


def sample_euler(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k_diffusion sample_euler without churn."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(x, sigma * s_in)
        d = (x - denoised) / sigma  # to_d; σ is a 0-d tensor, so append_dims is a no-op broadcast
        x = x + d * (sigmas[i + 1] - sigma)
    return x


def zimage_denoiser(
    model: nn.Module,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    cfg: float,
    *,
    forward_context: Callable[[], object] | None = None,
) -> Denoiser:
    """Denoised predictions of the raw Z-Image DiT under ComfyUI's CFG. Captions [1, L, D] (their own lengths)."""
    guided = not math.isclose(cfg, 1.0)
    if guided and negative is None:
        raise ValueError(f"cfg {cfg} needs negative caption features (the empty prompt's, usually)")

    def predict(x: torch.Tensor, sigma: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
        features = caption.expand(x.shape[0], -1, -1)
        with forward_context() if forward_context is not None else contextlib.nullcontext():
            raw = model(x, sigma, features)  # the model casts to its own dtype (ComfyUI: xc.to(dtype))
        return x - (-raw.float()) * sigma.view(-1, 1, 1, 1)  # CONST.calculate_denoised of NextDiT's -img

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond = predict(x, sigma, positive)
        if not guided:
            return cond
        uncond = predict(x, sigma, negative)
        return uncond + (cond - uncond) * cfg

    return denoise


@torch.no_grad()
def sample_zimage(
    model: nn.Module,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    settings: SamplerSettings,
    *,
    latent_shape: tuple[int, int, int],
    device: torch.device,
    forward_context: Callable[[], object] | None = None,
) -> torch.Tensor:
    """One image as ComfyUI's KSampler (euler, simple, denoise 1) samples it from an empty latent of
    ``latent_shape`` (C, H/8, W/8), batch 1. Captions [L, D]. Returns [C, h, w] float32 on the CPU, DiT latent format.

    The model runs as given (the caller picks eval mode, dtype and autocast); nothing here touches a global RNG."""
    noise = comfy_noise((1, *latent_shape), settings.seed).to(device)
    sigmas = simple_sigmas(settings.steps, settings.shift).to(device)
    positive = positive.to(device)[None]
    negative = negative.to(device)[None] if negative is not None else None
    denoise = zimage_denoiser(model, positive, negative, settings.cfg, forward_context=forward_context)
    x = sigmas[0] * noise + (1.0 - sigmas[0]) * torch.zeros_like(noise)  # CONST.noise_scaling of an empty latent
    x = sample_euler(denoise, x, sigmas)
    return (x / (1.0 - sigmas[-1]))[0].float().cpu()  # CONST.inverse_noise_scaling
