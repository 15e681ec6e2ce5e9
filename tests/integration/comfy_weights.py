"""Random-weight Flux VAE and small Qwen3-4B-shaped text encoder, written with ComfyUI's own module definitions.

Run with ComfyUI's Python from the ComfyUI folder: `python comfy_weights.py <out_dir>`. Writes
- `ae.safetensors`: the 16-channel Flux VAE (ComfyUI's Encoder/Decoder, the config VAELoader picks from the keys);
- `qwen3_4b_tiny.safetensors`: Qwen3-4B's widths (hidden 2560, 32/8 heads of 128, its vocabulary) with
  TEXT_ENCODER_LAYERS layers and a narrow MLP, keys as in the real file, so ComfyUI detects it as Z-Image's encoder.

Parameter names and shapes come from ComfyUI's classes built on the meta device; values are drawn here (ComfyUI's
layers skip initialisation): weights ~ N(0, 1/fan_in), norms 1, biases 0. bf16, like the published files.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

#: Matches the fixture node in comfyui_fixture_nodes (it reads the layer count and MLP width from the keys).
TEXT_ENCODER_LAYERS = 3
TEXT_ENCODER_MLP = 256
FLUX_VAE_CONFIG = {
    "double_z": True,
    "z_channels": 16,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def random_state(module: torch.nn.Module, prefix: str, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in module.state_dict().items():
        shape = tuple(meta.shape)
        if len(shape) == 1:
            is_bias = name.endswith(".bias")
            tensor = torch.zeros(shape) if is_bias else torch.ones(shape)
        else:
            fan_in = math.prod(shape[1:])
            tensor = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
        state[prefix + name] = tensor.to(torch.bfloat16)
    return state


def flux_vae() -> dict[str, torch.Tensor]:
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    with torch.device("meta"):
        model = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": FLUX_VAE_CONFIG},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": FLUX_VAE_CONFIG},
        )
    return random_state(model, "", seed=1)


def small_qwen3_4b() -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.text_encoders.llama import Qwen3_4B

    config = {"num_hidden_layers": TEXT_ENCODER_LAYERS, "intermediate_size": TEXT_ENCODER_MLP}
    with torch.device("meta"):
        model = Qwen3_4B(config, torch.bfloat16, "meta", comfy.ops.disable_weight_init)
    return random_state(model, "", seed=2)


def main(out_dir: Path) -> None:
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported: no GPU probing
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, build in (("ae.safetensors", flux_vae), ("qwen3_4b_tiny.safetensors", small_qwen3_4b)):
        partial = out_dir / f".{name}.partial"
        save_file(build(), str(partial))
        os.replace(partial, out_dir / name)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # run from the ComfyUI folder
    main(Path(sys.argv[1]))
