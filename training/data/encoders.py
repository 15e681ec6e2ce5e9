"""The encoder protocol the packer uses, and small deterministic encoders for tests and benchmarks.

Two implementations of the protocol encode for real: ComfyUI's own VAE and CLIP in the Pack Dataset node
(nodes/encoders.py), and our plain-torch Flux VAE and Qwen3 text encoder read from the same files for the CLI
(training/model/flux_vae.py, qwen3.py). This module never imports either.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch

LATENT_CHANNELS = 16
LATENT_DOWNSCALE = 8


@runtime_checkable
class LatentEncoder(Protocol):
    #: Name plus a weights hash, recorded in manifest.json so latents from different VAEs are never mixed.
    identity: str

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] float in [0, 1] -> [B, 16, H/8, W/8]."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    identity: str
    feature_dim: int

    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """Captions -> one [L_i, feature_dim] tensor of per-token features each (L_i may differ)."""
        ...


def _weights_digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class TestLatentEncoder:
    """A fixed random 8x8-stride conv standing in for the VAE encoder (deterministic for a seed). Tests only."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, LATENT_CHANNELS, LATENT_DOWNSCALE, stride=LATENT_DOWNSCALE)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.05)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=generator) * 0.1)
        self.identity = f"test-latent-conv8:seed{seed}:{_weights_digest(self.conv.weight, self.conv.bias)}"

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % 8 or images.shape[3] % 8:
            raise ValueError(f"TestLatentEncoder expects [B, 3, H, W] with H, W multiples of 8, got {images.shape}")
        return self.conv(images.float() * 2.0 - 1.0)


class TestTextEncoder:
    """Per-character tokens (plus a BOS token) looked up in a fixed random table. Tests only.

    feature_dim defaults to the tiny test model's cap_feat_dim (32); the real Z-Image text features are 2560 wide.
    """

    __test__ = False

    def __init__(self, *, feature_dim: int = 32, max_tokens: int = 512, vocab_size: int = 4096, seed: int = 0) -> None:
        if feature_dim <= 0 or max_tokens <= 0:
            raise ValueError(f"feature_dim={feature_dim} and max_tokens={max_tokens} must be positive")
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab_size, feature_dim, generator=generator)
        self.position = torch.randn(max_tokens + 1, feature_dim, generator=generator) * 0.1
        self.feature_dim = feature_dim
        self.max_tokens = max_tokens
        self.identity = f"test-text-table:d{feature_dim}:seed{seed}:{_weights_digest(self.table, self.position)}"

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        features = []
        for caption in captions:
            ids = [0] + [1 + ord(char) % (self.table.shape[0] - 1) for char in caption[: self.max_tokens]]
            index = torch.tensor(ids, dtype=torch.long)
            features.append(self.table[index] + self.position[: len(ids)])
        return features


#: How to get trainable shards from raw-image ones, for every message that meets them (pack, inspect, train).
REPACK_HINT = (
    "repack with the VAE and the text encoder: python -m training pack IMAGES OUT "
    "--vae ComfyUI/models/vae/ae.safetensors --text-encoder ComfyUI/models/text_encoders/qwen_3_4b.safetensors"
)


def missing_encodings(contents: dict) -> list[str]:
    """What a shard set's manifest 'contents' lacks for training: 'latents' and/or 'caption features'."""
    missing = []
    if contents.get("latent_encoder") is None:
        missing.append("latents")
    if contents.get("text_encoder") is None:
        missing.append("caption features")
    return missing


def require_encoded(contents: dict, where: str) -> None:
    """ValueError naming the fix when the shards at `where` hold raw images (or no caption features)."""
    missing = missing_encodings(contents)
    if missing:
        raise ValueError(f"the shards in {where} hold no {' and no '.join(missing)} (raw images): {REPACK_HINT}")
