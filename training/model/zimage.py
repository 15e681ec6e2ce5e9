"""Z-Image's single-stream DiT (S3-DiT), numerically equal to diffusers' ``ZImageTransformer2DModel``.

The network takes noisy latents at noise level σ and returns its raw output, which is trained toward ``x0 − ε``
(ComfyUI negates it when sampling; so does the diffusers pipeline). Token order inside the joint sequence is
[caption ; image] as in ComfyUI; attention is order-free given the RoPE position ids, which follow the reference:
caption token j sits at (j+1, 0, 0), image token (r, c) at (P+1, r, c) with P the padded caption length, and image
pad tokens at (0, 0, 0). Caption and image are each padded to a multiple of 32 with learned pad tokens that take
part in attention; only batch padding (captions of different padded lengths) needs a key mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ZImageConfig
from .layers import FinalLayer, RMSNorm, Rope, TimestepEmbedder, TransformerBlock, rope_from_positions


def pad_captions(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample caption features [L_i, D] into a zero-padded [B, Lmax, D] tensor and lengths [B]."""
    lengths = torch.tensor([f.shape[0] for f in features], dtype=torch.long)  # on the CPU: no device sync
    return nn.utils.rnn.pad_sequence(features, batch_first=True), lengths


class ZImageTransformer(nn.Module):
    def __init__(self, config: ZImageConfig):
        super().__init__()
        self.config = config
        self.x_embedder = nn.Linear(config.patch_dim, config.dim)
        self.cap_embedder = nn.Sequential(
            RMSNorm(config.cap_feat_dim, config.norm_eps), nn.Linear(config.cap_feat_dim, config.dim)
        )
        self.t_embedder = TimestepEmbedder(config)
        self.x_pad_token = nn.Parameter(torch.zeros(1, config.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, config.dim))
        self.noise_refiner = nn.ModuleList(TransformerBlock(config, True) for _ in range(config.n_refiner_layers))
        self.context_refiner = nn.ModuleList(TransformerBlock(config, False) for _ in range(config.n_refiner_layers))
        self.layers = nn.ModuleList(TransformerBlock(config, True) for _ in range(config.n_layers))
        self.final_layer = FinalLayer(config)

    def forward(
        self,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        caption_features: torch.Tensor | list[torch.Tensor],
        caption_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latents [B, C, H, W] (one resolution per batch), σ [B] in [0, 1], caption features [B, L, D] with
        lengths [B] (None: all L), or a list of [L_i, D]. Returns the raw prediction [B, C, H, W] (≈ x0 − ε)."""
        if isinstance(caption_features, (list, tuple)):
            caption_features, caption_lengths = pad_captions(list(caption_features))
        batch, _, height, width = latents.shape
        if caption_lengths is None:
            caption_lengths = torch.full((batch,), caption_features.shape[1])
        adaln = self.t_embedder((1 - sigma) * self.config.t_scale)

        image, image_positions, n_image = self._embed_image(latents)
        caption, caption_positions, caption_mask = self._embed_captions(caption_features, caption_lengths)
        image_positions[:, :n_image, 0] = caption_mask.sum(1, keepdim=True) + 1  # image axis 0 = P_i + 1
        image_rope = self._rope(image_positions)
        caption_rope = self._rope(caption_positions)
        caption_key_mask = None if caption_mask.shape[1] == self._min_padded_length(caption_lengths) else caption_mask

        for block in self.noise_refiner:
            image = block(image, image_rope, None, adaln)
        for block in self.context_refiner:
            caption = block(caption, caption_rope, caption_key_mask)

        x = torch.cat([caption, image], dim=1)
        rope = (torch.cat([caption_rope[0], image_rope[0]], 1), torch.cat([caption_rope[1], image_rope[1]], 1))
        key_mask = None
        if caption_key_mask is not None:
            key_mask = torch.cat([caption_key_mask, caption_key_mask.new_ones(batch, image.shape[1])], dim=1)
        for block in self.layers:
            x = block(x, rope, key_mask, adaln)

        out = self.final_layer(x[:, caption.shape[1] : caption.shape[1] + n_image], adaln)
        return self._unpatchify(out, height, width)

    def _min_padded_length(self, lengths: torch.Tensor) -> int:
        multiple = self.config.seq_multiple
        return int((lengths.min() + multiple - 1) // multiple * multiple)

    def _rope(self, positions: torch.Tensor) -> Rope:
        return rope_from_positions(positions, self.config.axes_dims, self.config.rope_theta)

    def _embed_image(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Patchify (vector order pH, pW, C), embed, pad to the sequence multiple with ``x_pad_token``."""
        p = self.config.patch_size
        batch, channels, height, width = latents.shape
        if channels != self.config.in_channels:
            raise ValueError(f"latents have {channels} channels, the model expects {self.config.in_channels}")
        if height % p or width % p:  # as ComfyUI: circular padding up to the patch size, cropped on output
            latents = F.pad(latents, (0, -width % p, 0, -height % p), mode="circular")
            height, width = latents.shape[-2:]
        rows, cols = height // p, width // p
        patches = latents.view(batch, channels, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
        tokens = self.x_embedder(patches.reshape(batch, rows * cols, self.config.patch_dim).to(self.dtype))
        n_image = rows * cols
        n_pad = -n_image % self.config.seq_multiple
        tokens = torch.cat([tokens, self.x_pad_token.to(tokens.dtype).expand(batch, n_pad, -1)], dim=1)

        grid = torch.stack(
            torch.meshgrid(
                torch.arange(rows, device=latents.device), torch.arange(cols, device=latents.device), indexing="ij"
            ),
            dim=-1,
        ).reshape(n_image, 2)
        positions = torch.zeros(batch, n_image + n_pad, 3, dtype=torch.long, device=latents.device)
        positions[:, :n_image, 1:] = grid
        return tokens, positions, n_image

    def _embed_captions(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed, then fill [L_i, P_i) with ``cap_pad_token``; positions (j+1, 0, 0); mask marks j < P_i."""
        multiple = self.config.seq_multiple
        padded_lengths = (lengths + multiple - 1) // multiple * multiple
        total = int(padded_lengths.max())  # lengths on the CPU (as the loader gives them) cost no device sync
        lengths, padded_lengths = lengths.to(features.device), padded_lengths.to(features.device)
        if features.shape[1] < total:
            features = F.pad(features, (0, 0, 0, total - features.shape[1]))
        features = features[:, :total]
        tokens = self.cap_embedder(features.to(self.dtype))
        index = torch.arange(total, device=features.device)
        is_text = index[None, :] < lengths[:, None]
        mask = index[None, :] < padded_lengths[:, None]
        tokens = torch.where(is_text[..., None], tokens, self.cap_pad_token.to(tokens.dtype))
        positions = torch.zeros(features.shape[0], total, 3, dtype=torch.long, device=features.device)
        positions[..., 0] = index + 1
        return tokens, positions, mask

    def _unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p, channels = self.config.patch_size, self.config.in_channels
        rows, cols = -(-height // p), -(-width // p)
        image = tokens.view(tokens.shape[0], rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return image.reshape(tokens.shape[0], channels, rows * p, cols * p)[:, :, :height, :width]

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def blocks(self) -> list[TransformerBlock]:
        """Every transformer block in execution order (refiners, then the main layers)."""
        return [*self.noise_refiner, *self.context_refiner, *self.layers]
