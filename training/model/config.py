"""Typed configuration of the Z-Image single-stream DiT (S3-DiT) and its presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

#: Caption and image token sequences are padded to a multiple of this (pad tokens are attended).
SEQ_MULTIPLE = 32


@dataclass(kw_only=True, frozen=True)
class ZImageConfig:
    """Architecture hyperparameters. Defaults are the published 6.15 B Z-Image (Turbo and Base share them)."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    ffn_hidden_dim: int = 10240
    cap_feat_dim: int = 2560
    in_channels: int = 16
    patch_size: int = 2
    axes_dims: tuple[int, ...] = (32, 48, 48)
    rope_theta: float = 256.0
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-5
    final_norm_eps: float = 1e-6
    t_scale: float = 1000.0
    adaln_dim: int = 256
    t_embed_hidden_dim: int = 1024
    t_freq_dim: int = 256
    seq_multiple: int = field(default=SEQ_MULTIPLE)

    def __post_init__(self) -> None:
        positive = ("dim", "n_layers", "n_heads", "ffn_hidden_dim", "cap_feat_dim", "in_channels", "patch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ZImageConfig.{name} must be a positive integer, got {value!r}")
        if self.n_refiner_layers < 0:
            raise ValueError(f"ZImageConfig.n_refiner_layers must be >= 0, got {self.n_refiner_layers!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ZImageConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(
                f"ZImageConfig.axes_dims={self.axes_dims} must sum to head_dim={self.head_dim} (dim / n_heads)"
            )
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"ZImageConfig.axes_dims={self.axes_dims} must all be even (RoPE rotates pairs)")
        for name in ("norm_eps", "qk_norm_eps", "final_norm_eps", "rope_theta", "t_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ZImageConfig.{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        """Values in one patch vector (pH·pW·C)."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def modulation_dim(self) -> int:
        """Width of the adaLN conditioning vector: min(dim, 256) as in the reference code."""
        return min(self.dim, self.adaln_dim)

    def replace(self, **changes) -> ZImageConfig:
        return dataclasses.replace(self, **changes)

    # -- parameter accounting (used by the memory planner; checked against the real module in tests) --

    def block_params(self, modulated: bool) -> int:
        d, h = self.dim, self.ffn_hidden_dim
        attention = 3 * d * d + d * d + 2 * self.head_dim
        feed_forward = 3 * d * h
        norms = 4 * d
        adaln = (self.modulation_dim * 4 * d + 4 * d) if modulated else 0
        return attention + feed_forward + norms + adaln

    def linear_params_per_block(self) -> int:
        """Weights of the big matmuls of one block (qkv, out, w1, w2, w3): what LoRA targets and FLOPs count."""
        return 4 * self.dim * self.dim + 3 * self.dim * self.ffn_hidden_dim

    def total_params(self) -> int:
        d, m = self.dim, self.modulation_dim
        blocks = (self.n_layers + self.n_refiner_layers) * self.block_params(True)
        blocks += self.n_refiner_layers * self.block_params(False)
        embedders = self.patch_dim * d + d  # x_embedder
        embedders += self.cap_feat_dim + self.cap_feat_dim * d + d  # cap_embedder: RMSNorm + Linear
        embedders += self.t_freq_dim * self.t_embed_hidden_dim + self.t_embed_hidden_dim  # t_embedder.mlp.0
        embedders += self.t_embed_hidden_dim * m + m  # t_embedder.mlp.2
        final = m * d + d + d * self.patch_dim + self.patch_dim
        pad_tokens = 2 * d
        return blocks + embedders + final + pad_tokens


PRESETS: dict[str, ZImageConfig] = {
    "z-image": ZImageConfig(),
    # Small enough for CPU tests and the demo; keeps every structural feature (refiners, 3-axis RoPE, SwiGLU).
    "tiny": ZImageConfig(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=4,
        ffn_hidden_dim=170,  # int(dim / 3 * 8), the reference rule, so diffusers can build the same model
        cap_feat_dim=32,
        axes_dims=(4, 6, 6),
    ),
}


def preset(name: str) -> ZImageConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
