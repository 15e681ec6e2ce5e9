"""Encode a packed shard set's images and captions with ComfyUI's own VAE and text encoder (the reference side of
test_encoder_parity.py). Run with ComfyUI's Python from the ComfyUI folder:

    python comfy_encode.py <shard_dir> <vae.safetensors> <text_encoder.safetensors> <out.safetensors>

Loads the files as ComfyUI's VAELoader and CLIPLoader (type lumina2, which Z-Image workflows use) do, with the
layer count and MLP width of a small Qwen3-4B-shaped file passed as model_options (as comfyui_fixture_nodes does).
For every sample writes `<key>.latent` (vae.encode of the stored PNG, then the Flux latent format, as the Pack node
stores it) and `<key>.caption` (the conditioning with the attention mask applied, as the Pack node stores it), plus
`__empty__.caption` for "". Reads the tar and PNG files only; writes safetensors (nothing pickled either way).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def samples(shard_dir: Path):
    manifest = json.loads((shard_dir / "manifest.json").read_text(encoding="utf-8"))
    for shard in manifest["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard_dir / shard["name"]) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
        yield from members.items()


def load_clip(path: str, embeddings: str):
    import comfy.sd
    import comfy.utils

    state = comfy.utils.load_torch_file(path, safe_load=True)
    layers = 1 + max(int(m.group(1)) for key in state if (m := _LAYER.match(key)))
    mlp = state["model.layers.0.mlp.up_proj.weight"].shape[0]
    options = {"qwen3_4b_model_config": {"num_hidden_layers": layers, "intermediate_size": mlp}}
    return comfy.sd.load_text_encoder_state_dicts(
        [state], embedding_directory=[embeddings], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=options
    )


def caption_features(clip, text: str) -> torch.Tensor:
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_dict=True)
    cond, mask = out["cond"], out.get("attention_mask")
    features = cond[0]
    if mask is not None:
        features = features[mask[0].to(torch.bool)]
    return features.float().contiguous()


def main(shard_dir: Path, vae_path: str, clip_path: str, out_path: Path) -> None:
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import comfy.latent_formats
    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path, safe_load=True))
    with tempfile.TemporaryDirectory() as embeddings:
        clip = load_clip(clip_path, embeddings)
        result = {"__empty__.caption": caption_features(clip, "")}
        for key, members in samples(shard_dir):
            with Image.open(io.BytesIO(members["png"])) as image:
                pixels = torch.from_numpy(np.array(image.convert("RGB"))).float().div(255.0)[None]
            raw = vae.encode(pixels)
            result[f"{key}.latent"] = comfy.latent_formats.Flux().process_in(raw.float())[0].contiguous()
            result[f"{key}.caption"] = caption_features(clip, members["txt"].decode("utf-8"))
    save_file(result, str(out_path))


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # run from the ComfyUI folder
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
