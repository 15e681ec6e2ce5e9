"""Random-init encoder files in Z-Image's layouts, for packing benchmarks where no weights can be downloaded.

``full``: the Flux VAE's encoder as ComfyUI's ``models/vae/ae.safetensors`` holds it (ch 128, ch_mult 1,2,4,4, two
ResNet blocks per level, 16 latent channels; float32) and a Qwen3-4B text encoder as ``qwen_3_4b.safetensors`` holds
it (36 layers, hidden 2560, 32/8 heads of 128, MLP 9728, vocabulary 151936; bfloat16, about 8 GB). ``tiny``: the same
layouts at the test suite's widths (tests/encoder_fixtures.py), for the CPU smoke test. Both are written through the
repository's own safetensors writer and read back by the packer's own readers (training/model/flux_vae.py, qwen3.py),
which derive every shape from the file. The tokenizer is the test suite's small byte-level BPE (ComfyUI's Qwen
vocabulary cannot be downloaded either): captions come out a few times longer in tokens than with Qwen's, so the text
encoder's share is, if anything, overstated. Only the VAE's encoder half is written: the packer never reads the
decoder. Random weights make noise latents and features, at the real cost: the FLOPs and bytes of the real models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from training.model.qwen3 import Qwen3Shape
from training.model.safetensors_io import write_safetensors


@dataclass(frozen=True, kw_only=True)
class EncoderSizes:
    vae_channels: tuple[int, ...]  # per level
    vae_res_blocks: int
    text: Qwen3Shape


SIZES = {
    "full": EncoderSizes(
        vae_channels=(128, 256, 512, 512),
        vae_res_blocks=2,
        text=Qwen3Shape(vocab_size=151936, hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=9728),
    ),
    "tiny": EncoderSizes(
        vae_channels=(32, 32, 64, 64),
        vae_res_blocks=1,
        text=Qwen3Shape(vocab_size=1024, hidden=32, layers=3, heads=4, kv_heads=2, head_dim=16, mlp=64),
    ),
}
LATENT_CHANNELS = 16


def vae_encoder_shapes(channels: tuple[int, ...], res_blocks: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the Flux VAE's encoder under ComfyUI's names, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out: int, into: int, kernel: int = 3) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, into, kernel, kernel), (out,)

    def norm(name: str, size: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (size,), (size,)

    def resnet(name: str, into: int, out: int) -> None:
        norm(f"{name}.norm1", into)
        conv(f"{name}.conv1", out, into)
        norm(f"{name}.norm2", out)
        conv(f"{name}.conv2", out, out)
        if into != out:
            conv(f"{name}.nin_shortcut", out, into, kernel=1)

    conv("encoder.conv_in", channels[0], 3)
    previous = channels[0]
    for level, width in enumerate(channels):
        for block in range(res_blocks):
            resnet(f"encoder.down.{level}.block.{block}", previous, width)
            previous = width
        if level != len(channels) - 1:
            conv(f"encoder.down.{level}.downsample.conv", width, width)
    resnet("encoder.mid.block_1", previous, previous)
    norm("encoder.mid.attn_1.norm", previous)
    for part in ("q", "k", "v", "proj_out"):
        conv(f"encoder.mid.attn_1.{part}", previous, previous, kernel=1)
    resnet("encoder.mid.block_2", previous, previous)
    norm("encoder.norm_out", previous)
    conv("encoder.conv_out", 2 * LATENT_CHANNELS, previous)  # the Gaussian's mean and log-variance
    return shapes


def qwen3_shapes(shape: Qwen3Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen3 text encoder under ComfyUI's names (embeddings tied: no lm_head), with its shape."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab_size, h)}
    for index in range(shape.layers):
        prefix = f"model.layers.{index}."
        shapes |= {
            prefix + "input_layernorm.weight": (h,),
            prefix + "post_attention_layernorm.weight": (h,),
            prefix + "self_attn.q_proj.weight": (q, h),
            prefix + "self_attn.k_proj.weight": (kv, h),
            prefix + "self_attn.v_proj.weight": (kv, h),
            prefix + "self_attn.o_proj.weight": (h, q),
            prefix + "self_attn.q_norm.weight": (shape.head_dim,),
            prefix + "self_attn.k_norm.weight": (shape.head_dim,),
            prefix + "mlp.gate_proj.weight": (shape.mlp, h),
            prefix + "mlp.up_proj.weight": (shape.mlp, h),
            prefix + "mlp.down_proj.weight": (h, shape.mlp),
        }
    shapes["model.norm.weight"] = (h,)
    return shapes


def random_tensors(
    shapes: dict[str, tuple[int, ...]], *, dtype: torch.dtype, device: torch.device, seed: int
) -> list[tuple[str, torch.Tensor]]:
    """Norm weights near 1, biases near 0, matrices and convolutions ~ N(0, 1/fan_in), embeddings ~ N(0, 1): the
    activations stay in range through every layer, as with trained weights."""
    generator = torch.Generator(device=device).manual_seed(seed)
    entries = []
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        if len(shape) == 1:
            values.mul_(0.1).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        elif "embed_tokens" not in name:
            values.div_(math.sqrt(math.prod(shape[1:])))
        entries.append((name, values.to(dtype)))
    return entries


def write_random_encoders(folder: Path, size: str, *, device: torch.device, seed: int = 0) -> dict[str, Path]:
    """``folder``/ae_random_<size>.safetensors, qwen3_random_<size>.safetensors and a tokenizer folder; the
    weights are drawn on ``device`` (a GPU draws 4 B numbers in well under a second) and streamed to disk."""
    from tests.encoder_fixtures import SPECIAL_TOKENS, write_tiny_tokenizer

    sizes = SIZES[size]
    tokenizer = write_tiny_tokenizer(folder / "tokenizer")
    vocabulary = len(json.loads((tokenizer / "vocab.json").read_text(encoding="utf-8"))) + len(SPECIAL_TOKENS)
    if vocabulary > sizes.text.vocab_size:
        raise ValueError(f"the tokenizer has {vocabulary} ids, more than the {size} text encoder's table")
    files = {
        "vae": folder / f"ae_random_{size}.safetensors",
        "text_encoder": folder / f"qwen3_random_{size}.safetensors",
    }
    vae = random_tensors(
        vae_encoder_shapes(sizes.vae_channels, sizes.vae_res_blocks), dtype=torch.float32, device=device, seed=seed
    )
    write_safetensors(files["vae"], vae, {"format": "pt", "random_init": "flux-vae-encoder"})
    text = random_tensors(qwen3_shapes(sizes.text), dtype=torch.bfloat16, device=device, seed=seed + 1)
    write_safetensors(files["text_encoder"], text, {"format": "pt", "random_init": "qwen3"})
    del vae, text
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {**files, "tokenizer": tokenizer}
