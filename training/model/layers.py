"""Building blocks of the Z-Image transformer. Parameter names follow ComfyUI's single-file layout."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ZImageConfig

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [B, S, 1, head_dim / 2] float32


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def rope_frequencies(axes_dims: tuple[int, ...], theta: float, device: torch.device) -> list[torch.Tensor]:
    """Per-axis inverse frequencies, float64 as in the reference implementation."""
    return [1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)) for d in axes_dims]


def rope_from_positions(positions: torch.Tensor, axes_dims: tuple[int, ...], theta: float) -> Rope:
    """Cos/sin tables for integer positions [B, S, n_axes]; axis angles are concatenated along the last dim."""
    freqs = rope_frequencies(axes_dims, theta, positions.device)
    angles = torch.cat([positions[..., i, None].double() * f for i, f in enumerate(freqs)], dim=-1).float()
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, D] by the angles in ``rope``."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.out = nn.Linear(config.dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.qk_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.qk_norm_eps)

    def forward(self, x: torch.Tensor, rope: Rope, key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.n_heads, -1).unbind(2)
        q = apply_rope(self.q_norm(q), rope)
        k = apply_rope(self.k_norm(k), rope)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        return self.out(out.transpose(1, 2).reshape(batch, seq, dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre/post-normed attention and SwiGLU with Z-Image's tanh-gated scale modulation (no shift, no SiLU)."""

    def __init__(self, config: ZImageConfig, modulated: bool):
        super().__init__()
        self.modulated = modulated
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.attention_norm1 = RMSNorm(config.dim, config.norm_eps)
        self.attention_norm2 = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm1 = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm2 = RMSNorm(config.dim, config.norm_eps)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.Linear(config.modulation_dim, 4 * config.dim))

    def forward(
        self, x: torch.Tensor, rope: Rope, key_mask: torch.Tensor | None = None, adaln: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, key_mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln).unsqueeze(1).chunk(4, dim=2)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope, key_mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)


class TimestepEmbedder(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.freq_dim = config.t_freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(config.t_freq_dim, config.t_embed_hidden_dim),
            nn.SiLU(),
            nn.Linear(config.t_embed_hidden_dim, config.modulation_dim),
        )

    def forward(self, t: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(config.dim, elementwise_affine=False, eps=config.final_norm_eps)
        self.linear = nn.Linear(config.dim, config.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.modulation_dim, config.dim))

    def forward(self, x: torch.Tensor, adaln: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.adaLN_modulation(adaln).unsqueeze(1)
        return self.linear(self.norm_final(x) * scale)
