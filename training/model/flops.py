"""Analytic FLOP counts of the Z-Image transformer, used for throughput (TFLOP/s, MFU) figures.

The count is the peers' (``bench/peers``): every block Linear on the tokens it sees plus the two attention matmuls;
pad tokens, norms, RoPE and the small embedders are not counted, so the figure is *useful* work.
"""

from __future__ import annotations

from .config import ZImageConfig


def forward_flops(config: ZImageConfig, *, image_tokens: int, caption_tokens: int, batch: int = 1) -> int:
    linear_per_token = 2 * config.linear_params_per_block()
    joint = image_tokens + caption_tokens
    refiner_tokens = image_tokens + caption_tokens  # each refiner stack sees one stream
    flops = config.n_layers * joint * linear_per_token + config.n_refiner_layers * refiner_tokens * linear_per_token
    flops += config.n_layers * 4 * joint * joint * config.dim
    flops += config.n_refiner_layers * 4 * (image_tokens**2 + caption_tokens**2) * config.dim
    return batch * flops


def training_flops(
    config: ZImageConfig, *, image_tokens: int, caption_tokens: int, batch: int = 1, full_finetune: bool = False
) -> int:
    """Useful FLOPs of one training step: forward + input-gradient backward, + weight gradients for full FT."""
    forward = forward_flops(config, image_tokens=image_tokens, caption_tokens=caption_tokens, batch=batch)
    return forward * (3 if full_finetune else 2)


def image_tokens_for(resolution: int | tuple[int, int], config: ZImageConfig) -> int:
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    side = 8 * config.patch_size  # VAE downsampling × patch size
    return (width // side) * (height // side)
