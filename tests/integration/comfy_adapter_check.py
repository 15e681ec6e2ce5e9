"""Each adapter type, saved by the engine, applied by the real ComfyUI: unloaded keys and patched weights vs the
engine's own float32 merge. Run with ComfyUI's Python from the ComfyUI folder (it has peft, which the engine needs):

    python comfy_adapter_check.py <repo> <dit.safetensors> <work dir> <out.json> lora dora lokr loha

Per adapter type: attach it (every preset module: "all") to our model loaded from the DiT file, move every trained
tensor off its init (seeded), save the file as the engine does (float32), then ComfyUI loads the same DiT file
(comfy.sd.load_diffusion_model), converts and loads the file the way the Load Trained LoRA node does
(comfy.lora_convert.convert_lora, comfy.lora.load_lora over model_lora_keys_unet), adds the patches to a clone and
computes every patched weight with comfy.lora.calculate_weight in float32 (the offsets of the q/k/v slices included).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

TARGETS = "all"
RANK = 8


class _Unloaded(logging.Handler):
    """Counts ComfyUI's "lora key not loaded" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("lora key not loaded"):
            self.keys.append(message.split(": ", 1)[-1])


def attach_and_save(model, adapter: str, out_file: Path) -> None:
    """Attach the adapter to our model, move its tensors off their init (seeded) and save its file (float32)."""
    from training.model.lora import LoraSettings, adapter_file_state, attach_lora
    from training.model.lora_file import save_lora_file

    settings = LoraSettings(rank=RANK, alpha=RANK / 2, targets=TARGETS, adapter=adapter)
    torch.manual_seed(0)
    attach_lora(model, settings, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # ~1 % of a weight's size per entry of the delta, whatever the type
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        save_lora_file(out_file, adapter_file_state(model), settings, dtype=torch.float32)


def comfy_patches(patcher, lora_file: Path):
    """The file loaded as the Load Trained LoRA node does, its patches added to a clone of the model."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils

    unloaded = _Unloaded()
    logging.getLogger().addHandler(unloaded)
    try:
        state = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(lora_file), safe_load=True))
        patches = comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(patcher.model, {}), log_missing=True)
    finally:
        logging.getLogger().removeHandler(unloaded)
    clone = patcher.clone()
    applied = clone.add_patches(patches, 1.0)
    counts = {"unloaded": unloaded.keys, "file_keys": len(state), "patches": len(patches), "applied": len(applied)}
    return clone, counts


def compare(model, clone) -> dict:
    """Layer by layer: the engine's merged weight (float32) vs ComfyUI's calculate_weight of the same base weight in
    float32. Errors are relative to each weight's largest entry; the smallest change an adapter made is reported
    too, so that two unpatched weights cannot compare equal unnoticed. The model is given back without adapters."""
    import comfy.lora

    from training.model import adapters
    from training.model.lora import lora_layers

    model_sd = clone.model.state_dict()
    worst, worst_key, smallest_change, compared = 0.0, "", float("inf"), []
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            key = f"diffusion_model.{name}.weight"
            merged, base = adapters.merged_weight(layer), adapters.base_weight(layer)
            if key in clone.patches:
                start = model_sd[key].float().clone()
                theirs = comfy.lora.calculate_weight(clone.patches[key], start, key, intermediate_dtype=torch.float32)
                scale = merged.abs().max().item()
                error = (theirs - merged).abs().max().item() / scale
                if error >= worst:
                    worst, worst_key = error, key
                smallest_change = min(smallest_change, (merged - base).abs().max().item() / scale)
                compared.append(key)
            parent, _, child = name.rpartition(".")  # unwrap: the next type attaches to the plain base again
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
    del model.peft_config  # the bookkeeping peft leaves on the model; the next type starts afresh
    return {
        "compared": len(compared),
        "comfy_patched_weights": len(clone.patches),
        "max_relative_error": worst,
        "worst_key": worst_key,
        "smallest_adapter_change": smallest_change,
    }


def main(repo: Path, dit: Path, work: Path, out: Path, adapter_types: list[str]) -> None:
    from comfy.cli_args import args

    args.cpu = True
    sys.path.insert(0, str(repo))
    import comfy.sd

    from training.model.lora import lora_layers
    from training.model.weights import load_transformer

    match_keys = _lora_keys_module(repo).match_keys
    model = load_transformer(dit, dtype=torch.bfloat16, device=torch.device("cpu"))  # bf16 values, fp32 math
    patcher = comfy.sd.load_diffusion_model(str(dit))
    results = {}
    for adapter in adapter_types:
        lora_file = work / f"{adapter}.safetensors"
        attach_and_save(model, adapter, lora_file)
        engine_layers = len(lora_layers(model))
        clone, counts = comfy_patches(patcher, lora_file)
        node_match = match_keys(_file_keys(lora_file), _key_map(patcher))  # the Load Trained LoRA node's check
        results[adapter] = {**counts, "engine_layers": engine_layers, "node_accepts": node_match.ok}
        results[adapter].update(compare(model, clone))
        del clone
        print(adapter, json.dumps(results[adapter]), flush=True)
    out.write_text(json.dumps(results, indent=1))


def _lora_keys_module(repo: Path):
    """nodes/lora_keys.py on its own (stdlib only): the nodes package itself imports as part of the pack."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("whetstone_lora_keys", repo / "nodes" / "lora_keys.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _key_map(patcher) -> dict:
    import comfy.lora

    return comfy.lora.model_lora_keys_unet(patcher.model, {})


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # run from the ComfyUI folder
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:])
