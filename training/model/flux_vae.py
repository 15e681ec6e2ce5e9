"""Z-Image's VAE: the 16-channel Flux autoencoder (the encoder for packing, the decoder for previews), read from ComfyUI's models/vae/ae.safetensors.

Computed as ComfyUI 0.8 does (comfy/sd.py VAE.encode, comfy/ldm/modules/diffusionmodules/model.py Encoder,
comfy/ldm/models/autoencoder.py): pixels x in 0..1 -> 2x-1 -> Encoder (GroupNorm(32, eps 1e-6) + SiLU ResNet blocks,
downsampling by a stride-2 conv after zero-padding right and bottom by one, a single-head self-attention in the
middle) -> the Gaussian's mean (the first 16 of 32 channels) -> the Flux latent format (z - 0.1159) * 0.3611, which is
what the Pack Dataset node stores (ComfyUI's model.process_latent_in) and what the DiT sees.

ComfyUI runs the VAE in bfloat16 on GPUs that support it and in float32 elsewhere; dtype='auto' does the same.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .encoder_files import fingerprint, load_tensors, pick_device, read_file_sources
from .safetensors_io import WeightsError

logger = logging.getLogger(__name__)

#: comfy.latent_formats.Flux
FLUX_SHIFT = 0.1159
FLUX_SCALE = 0.3611
LATENT_CHANNELS = 16
GROUPS = 32
GROUP_NORM_EPS = 1e-6
_LEVEL = re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.")
_WHAT_TO_DO = "pick Z-Image's VAE: the 16-channel Flux autoencoder, ComfyUI's models/vae/ae.safetensors"


@dataclass(frozen=True, kw_only=True)
class FluxEncoderShape:
    channels: tuple[int, ...]  # per level: ch * ch_mult[i]
    res_blocks: int
    z_channels: int

    @classmethod
    def from_file(cls, shapes: dict[str, tuple[int, ...]], path) -> FluxEncoderShape:
        if "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:
            raise WeightsError(f"{path} is a diffusers-layout VAE; {_WHAT_TO_DO}")
        if "encoder.conv_in.weight" not in shapes or "encoder.conv_out.weight" not in shapes:
            raise WeightsError(f"{path} is not an autoencoder's weights (no encoder.conv_in/conv_out); {_WHAT_TO_DO}")
        if "quant_conv.weight" in shapes or any(".attn." in key for key in shapes if key.startswith("encoder.down")):
            raise WeightsError(f"{path} is an SD-style VAE (quant_conv or attention in down blocks); {_WHAT_TO_DO}")
        blocks = {(int(m[1]), int(m[2])) for m in map(_LEVEL.match, shapes) if m}
        levels = 1 + max(level for level, _ in blocks)
        res_blocks = 1 + max(block for _, block in blocks)
        channels = tuple(shapes[f"encoder.down.{level}.block.0.conv1.weight"][0] for level in range(levels))
        z_channels = shapes["encoder.conv_out.weight"][0] // 2
        if z_channels != LATENT_CHANNELS or shapes["encoder.conv_in.weight"][1] != 3:
            raise WeightsError(f"{path} makes {z_channels}-channel latents from RGB, Z-Image needs 16; {_WHAT_TO_DO}")
        return cls(channels=channels, res_blocks=res_blocks, z_channels=z_channels)

    def keys(self, part: str = "encoder") -> list[str]:
        """Every tensor name of the encoder or decoder half this shape reads (shortcut convs aside)."""
        levels = range(len(self.channels))
        names = [f"{part}.conv_in", f"{part}.norm_out", f"{part}.conv_out"]
        if part == "encoder":
            resnets = [f"encoder.down.{lv}.block.{b}" for lv in levels for b in range(self.res_blocks)]
            names += [f"encoder.down.{lv}.downsample.conv" for lv in levels[:-1]]
        else:
            resnets = [f"decoder.up.{lv}.block.{b}" for lv in levels for b in range(self.res_blocks + 1)]
            names += [f"decoder.up.{lv}.upsample.conv" for lv in levels[1:]]
        resnets += [f"{part}.mid.block_1", f"{part}.mid.block_2"]
        names += [f"{r}.{layer}" for r in resnets for layer in ("norm1", "conv1", "norm2", "conv2")]
        names += [f"{part}.mid.attn_1.{layer}" for layer in ("norm", "q", "k", "v", "proj_out")]
        return [f"{name}.{kind}" for name in names for kind in ("weight", "bias")]


class FluxVAE:
    """Pixels [B, 3, H, W] in 0..1 <-> Flux-format latents [B, 16, H/8, W/8]; the decoder only when loaded with it."""

    def __init__(self, shape: FluxEncoderShape, state: dict[str, torch.Tensor]) -> None:
        self.shape = shape
        self.state = state

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device, dtype: torch.dtype, decoder: bool = False) -> FluxVAE:
        sources = read_file_sources(path, "VAE")
        shape = FluxEncoderShape.from_file({key: source.shape for key, source in sources.items()}, path)
        parts = ("encoder", "decoder") if decoder else ("encoder",)
        names = [name for part in parts for name in shape.keys(part)]
        shortcuts = [b for b in _shortcut_blocks(sources) if b.split(".")[0] in parts]
        names += [f"{block}.nin_shortcut.{kind}" for block in shortcuts for kind in ("weight", "bias")]
        missing = [name for name in names if name not in sources]
        if missing:
            raise WeightsError(
                f"{path} lacks {len(missing)} {'/'.join(parts)} tensors ({missing[0]}, ...); {_WHAT_TO_DO}"
            )
        logger.info("VAE %s: Flux encoder, channels %s, %d blocks per level", path, shape.channels, shape.res_blocks)
        return cls(shape, load_tensors(sources, {name: name for name in names}, device=device, dtype=dtype))

    def _conv(self, x: torch.Tensor, name: str, *, stride: int = 1, padding: int = 1) -> torch.Tensor:
        return F.conv2d(x, self.state[f"{name}.weight"], self.state[f"{name}.bias"], stride=stride, padding=padding)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.group_norm(x, GROUPS, self.state[f"{name}.weight"], self.state[f"{name}.bias"], GROUP_NORM_EPS)

    def _resnet(self, x: torch.Tensor, name: str) -> torch.Tensor:
        h = self._conv(F.silu(self._norm(x, f"{name}.norm1")), f"{name}.conv1")
        h = self._conv(F.silu(self._norm(h, f"{name}.norm2")), f"{name}.conv2")
        if f"{name}.nin_shortcut.weight" in self.state:
            x = self._conv(x, f"{name}.nin_shortcut", padding=0)
        return x + h

    def _attention(self, x: torch.Tensor, name: str) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self._norm(x, f"{name}.norm")
        q, k, v = (self._conv(h, f"{name}.{part}", padding=0) for part in "qkv")
        q, k, v = (t.reshape(batch, 1, channels, height * width).transpose(2, 3) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(batch, channels, height, width)
        return x + self._conv(h, f"{name}.proj_out", padding=0)

    @torch.no_grad()
    def raw_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The Gaussian's mean before the latent format, in the VAE's dtype on its device."""
        weight = self.state["encoder.conv_in.weight"]
        x = (pixels.float() * 2.0 - 1.0).to(weight.device, weight.dtype)  # ComfyUI: process_input, then the dtype
        x = self._conv(x, "encoder.conv_in")
        for level in range(len(self.shape.channels)):
            for block in range(self.shape.res_blocks):
                x = self._resnet(x, f"encoder.down.{level}.block.{block}")
            if level != len(self.shape.channels) - 1:
                x = self._conv(F.pad(x, (0, 1, 0, 1)), f"encoder.down.{level}.downsample.conv", stride=2, padding=0)
        x = self._resnet(x, "encoder.mid.block_1")
        x = self._attention(x, "encoder.mid.attn_1")
        x = self._resnet(x, "encoder.mid.block_2")
        x = self._conv(F.silu(self._norm(x, "encoder.norm_out")), "encoder.conv_out")
        return x[:, : self.shape.z_channels]

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return (self.raw_latents(pixels).float().cpu() - FLUX_SHIFT) * FLUX_SCALE

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Flux-format latents -> pixels [B, 3, 8h, 8w] in 0..1 (float32 on the CPU), as ComfyUI's VAE.decode."""
        if "decoder.conv_in.weight" not in self.state:
            raise ValueError("this VAE was loaded without its decoder; load it with decoder=True")
        weight = self.state["decoder.conv_in.weight"]
        x = (latents.float() / FLUX_SCALE + FLUX_SHIFT).to(weight.device, weight.dtype)  # latent format: process_out
        x = self._conv(x, "decoder.conv_in")
        x = self._resnet(x, "decoder.mid.block_1")
        x = self._attention(x, "decoder.mid.attn_1")
        x = self._resnet(x, "decoder.mid.block_2")
        for level in reversed(range(len(self.shape.channels))):
            for block in range(self.shape.res_blocks + 1):
                x = self._resnet(x, f"decoder.up.{level}.block.{block}")
            if level != 0:
                x = self._conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), f"decoder.up.{level}.upsample.conv")
        x = self._conv(F.silu(self._norm(x, "decoder.norm_out")), "decoder.conv_out")
        return ((x.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def _shortcut_blocks(sources) -> list[str]:
    return sorted({key.removesuffix(".nin_shortcut.weight") for key in sources if key.endswith(".nin_shortcut.weight")})


def comfy_vae_dtype(device: torch.device) -> torch.dtype:
    """ComfyUI's default VAE dtype for the Flux VAE (working dtypes bf16, fp32): bf16 where the GPU supports it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class FluxLatentEncoder:
    """The packer's LatentEncoder for Z-Image: [B, 3, H, W] in 0..1 -> Flux-format latents [B, 16, H/8, W/8]."""

    def __init__(self, path: str | Path, *, device: str = "auto", dtype: torch.dtype | None = None) -> None:
        chosen = pick_device(device)
        dtype = dtype or comfy_vae_dtype(chosen)
        logger.info(
            "VAE runs in %s on %s (ComfyUI's default for this device)", str(dtype).removeprefix("torch."), chosen
        )
        self.model = FluxVAE.load(path, device=chosen, dtype=dtype)
        dtype_name = str(dtype).removeprefix("torch.")
        self.identity = f"flux-vae:{fingerprint(self.model.state)}:{dtype_name}:flux-process-in"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % 8 or images.shape[3] % 8:
            raise ValueError(f"the Flux VAE encodes [B, 3, H, W] with H, W multiples of 8, got {tuple(images.shape)}")
        return self.model.encode(images)
