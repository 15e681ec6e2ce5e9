"""Shared helpers for model tests: a tiny diffusers twin with our weights copied across."""

from __future__ import annotations

import torch

from training.model.config import ZImageConfig
from training.model.layouts import diffusers_names
from training.model.zimage import ZImageTransformer


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter with non-trivial values (zero pad tokens and unit norms would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if param.ndim == 1 else 0.0))


def diffusers_twin(model: ZImageTransformer):
    """diffusers' ZImageTransformer2DModel with the same config and weights (float32)."""
    from diffusers import ZImageTransformer2DModel

    cfg: ZImageConfig = model.config
    twin = ZImageTransformer2DModel(
        all_patch_size=(cfg.patch_size,),
        all_f_patch_size=(1,),
        in_channels=cfg.in_channels,
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_refiner_layers=cfg.n_refiner_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_heads,
        norm_eps=cfg.norm_eps,
        qk_norm=True,
        cap_feat_dim=cfg.cap_feat_dim,
        rope_theta=cfg.rope_theta,
        t_scale=cfg.t_scale,
        axes_dims=list(cfg.axes_dims),
        axes_lens=[4096, 512, 512],
    )
    twin.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)
    return twin.float().eval()


def to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        targets = diffusers_names(name)
        for target, part in zip(targets, tensor.chunk(len(targets), dim=0)):
            out[target] = part.clone()
    return out


def diffusers_forward(twin, latents, sigma, captions):
    out = twin([x.unsqueeze(1) for x in latents], 1 - sigma, list(captions), return_dict=False)[0]
    return torch.stack([o.squeeze(1) for o in out])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
