"""Test-only ComfyUI node (installed into the integration server's temporary custom_nodes, never shipped).

Z-Image's text encoder is Qwen3-4B (8 GB in bf16, 36 layers). ComfyUI builds it from a fixed config, but lets
model_options override any field ("<model name>_model_config", read in comfy/sd1_clip.py SDClipModel). This loader is
CLIPLoader with that override: the file has Qwen3-4B's keys and widths (so comfy.sd.detect_te_model picks QWEN3_4B and
the Z-Image tokenizer and model classes) but only a few layers and a narrow MLP, inferred here from the keys. The
conditioning is [1, L, 2560], exactly what Z-Image consumes, from ComfyUI's own code path.
"""

from __future__ import annotations

import re

import comfy.sd
import comfy.utils
import folder_paths

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class SmallQwen3TextEncoderLoader:
    DESCRIPTION = "Test fixture: loads a few-layer Qwen3-4B-shaped file as Z-Image's text encoder."
    CATEGORY = "Whetstone/testing"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("text_encoders"),)}}

    def load(self, clip_name):
        path = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        state = comfy.utils.load_torch_file(path, safe_load=True)
        layers = 1 + max(int(m.group(1)) for key in state if (m := _LAYER.match(key)))
        mlp = state["model.layers.0.mlp.up_proj.weight"].shape[0]
        options = {"qwen3_4b_model_config": {"num_hidden_layers": layers, "intermediate_size": mlp}}
        clip = comfy.sd.load_text_encoder_state_dicts(
            [state],
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
            clip_type=comfy.sd.CLIPType.LUMINA2,
            model_options=options,
        )
        return (clip,)


NODE_CLASS_MAPPINGS = {"WhetstoneTestSmallQwen3Loader": SmallQwen3TextEncoderLoader}
