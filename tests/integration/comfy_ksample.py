"""Sample with ComfyUI's own KSampler (the reference side of test_preview_parity.py). Run with ComfyUI's Python from
the ComfyUI folder:

    python comfy_ksample.py <dit.safetensors> <inputs.safetensors> <cases.json> <out.safetensors>

Loads the DiT as UNETLoader does (``comfy.sd.load_diffusion_model``, float32 on the CPU), builds conditioning the way
CLIPTextEncode hands it to KSampler (``[[features [1, L, D], {}]]``) from the caption features in ``inputs``
(``<case>.positive`` / ``<case>.negative``), applies ``ModelSamplingAuraFlow`` when a case's shift differs from the
model's own, starts from ``EmptySD3LatentImage`` and runs ``nodes.common_ksampler`` (what the KSampler node runs) with
sampler 'euler', scheduler 'simple', denoise 1. Writes each case's LATENT ``samples`` as ``<case>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def main(dit_path: str, inputs_path: str, cases_path: str, out_path: str) -> None:
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import comfy.sd
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    import nodes

    model = comfy.sd.load_diffusion_model(dit_path, model_options={"dtype": torch.float32})
    own_shift = model.get_model_object("model_sampling").shift
    inputs = load_file(inputs_path)
    result = {}
    for name, case in json.loads(Path(cases_path).read_text(encoding="utf-8")).items():
        sampled_model = model
        if case["shift"] != own_shift:
            (sampled_model,) = ModelSamplingAuraFlow().patch_aura(model, case["shift"])
        positive = [[inputs[f"{name}.positive"][None], {}]]
        negative = [[inputs[f"{name}.negative"][None], {}]]
        latent = {"samples": torch.zeros([1, 16, case["height"] // 8, case["width"] // 8])}  # EmptySD3LatentImage
        (out,) = nodes.common_ksampler(
            sampled_model, case["seed"], case["steps"], case["cfg"], "euler", "simple", positive, negative, latent
        )
        result[name] = out["samples"].float().contiguous()
    save_file(result, out_path)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # run from the ComfyUI folder
    main(*sys.argv[1:5])
