"""ComfyUI's VAE and CLIP objects adapted to the packer's LatentEncoder / TextEncoder protocol.

Latents are stored as the DiT sees them: ComfyUI's raw VAE latents passed through the Flux latent format
(model.process_latent_in), i.e. (z - 0.1159) * 0.3611. Text features are ComfyUI's Z-Image conditioning (Qwen3-4B
hidden states, [1, L, 2560]) with padding removed by the attention mask.
"""

from __future__ import annotations

import hashlib
import logging

import torch

from . import comfy_bridge

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16
_SAMPLED_TENSORS = 8
_SAMPLED_ELEMENTS = 4096


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap identity for multi-GB weights: every name, shape and dtype plus a slice of a few tensors."""
    state = module.state_dict()
    digest = hashlib.sha256()
    names = sorted(state)
    for name in names:
        digest.update(f"{name}:{tuple(state[name].shape)}:{state[name].dtype}\n".encode())
    step = max(1, len(names) // _SAMPLED_TENSORS)
    for name in names[::step]:
        sample = state[name].detach().flatten()[:_SAMPLED_ELEMENTS].to("cpu", torch.float32).contiguous()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class ComfyLatentEncoder:
    """A ComfyUI VAE as a LatentEncoder: [B, 3, H, W] in 0..1 -> process_in latents [B, 16, H/8, W/8]."""

    def __init__(self, vae) -> None:
        self.vae = vae
        model = getattr(vae, "first_stage_model", None)
        weights = weights_fingerprint(model) if isinstance(model, torch.nn.Module) else "unknown"
        self.identity = f"comfyui-vae:{type(model).__name__}:{weights}:flux-process-in"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raw = comfy_bridge.vae_encode(self.vae, images.movedim(1, -1))
        if raw.ndim != 4 or raw.shape[1] != LATENT_CHANNELS:
            raise ValueError(
                f"the VAE returned latents of shape {tuple(raw.shape)}; Z-Image needs the 16-channel Flux VAE "
                "(ae.safetensors) connected to Pack Dataset"
            )
        return comfy_bridge.process_latent_in(raw.float()).cpu()


class ComfyTextEncoder:
    """A ComfyUI CLIP (Z-Image's Qwen3-4B) as a TextEncoder: captions -> [L_i, 2560] per-token features."""

    def __init__(self, clip) -> None:
        self.clip = clip
        model = getattr(clip, "cond_stage_model", None)
        weights = weights_fingerprint(model) if isinstance(model, torch.nn.Module) else "unknown"
        self.identity = f"comfyui-clip:{type(model).__name__}:{weights}"
        self._feature_dim: int | None = None

    @property
    def feature_dim(self) -> int:
        if self._feature_dim is None:
            self._feature_dim = int(self._encode_one("").shape[-1])
        return self._feature_dim

    def _encode_one(self, caption: str) -> torch.Tensor:
        cond, mask = comfy_bridge.clip_encode(self.clip, caption)
        if cond.ndim != 3 or cond.shape[0] != 1:
            raise ValueError(f"the text encoder returned conditioning of shape {tuple(cond.shape)}, expected [1, L, D]")
        features = cond[0]
        if mask is not None:
            features = features[mask[0].to(torch.bool).to(features.device)]
        return features.float().cpu()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        features = [self._encode_one(caption) for caption in captions]
        if features and self._feature_dim is None:
            self._feature_dim = int(features[0].shape[-1])
        return features
