"""The engine's preview sampler equals ComfyUI's KSampler (opt-in: COMFYUI_PATH).

The same weights (the smallest file ComfyUI loads as Z-Image: dim 3840, one main layer, random init, cached by
model_fixtures), the same caption features, seed and settings go through `training.model.sampling.sample_zimage`
(here) and through ComfyUI's own loader, ModelSamplingAuraFlow and KSampler (comfy_ksample.py, under ComfyUI's
Python), float32 on the CPU. The latents must agree within 1e-3 relative. Cases: the model's own shift without
guidance (a Turbo-style preview), and another shift with cfg 4 and a negative prompt of another length (Base-style).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from integration.model_fixtures import DIT_FILE, dit_folder
from safetensors.torch import load_file, save_file

from training.model.sampling import SamplerSettings, from_comfy_latent, sample_zimage
from training.model.weights import load_transformer

pytestmark = pytest.mark.comfyui

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-3
CASES = {
    "own_shift_no_cfg": {"seed": 42, "steps": 4, "cfg": 1.0, "shift": 3.0, "width": 64, "height": 96, "tokens": 7},
    "shift6_cfg4": {"seed": 7, "steps": 3, "cfg": 4.0, "shift": 6.0, "width": 96, "height": 64, "tokens": 11},
}


@pytest.fixture(scope="module")
def comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set (see ../shared/docs/comfyui.md, 'Running a real ComfyUI')")
    comfy_path = Path(path)
    python = os.environ.get("COMFYUI_PYTHON") or str(comfy_path / "venv" / "bin" / "python")
    return comfy_path, python


def caption_inputs() -> dict[str, torch.Tensor]:
    """Caption features of Qwen3-4B's width and a plausible scale; the negatives are shorter (3 tokens)."""
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for name, case in CASES.items():
        inputs[f"{name}.positive"] = torch.randn(case["tokens"], 2560, generator=generator) * 2.0
        inputs[f"{name}.negative"] = torch.randn(3, 2560, generator=generator) * 2.0
    return inputs


def test_preview_sampler_matches_comfyui_ksampler(tmp_path, comfy):
    comfy_path, python = comfy
    dit = dit_folder() / DIT_FILE
    inputs = caption_inputs()
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    (tmp_path / "cases.json").write_text(json.dumps(CASES))
    command = [python, str(HERE / "comfy_ksample.py"), str(dit), str(tmp_path / "inputs.safetensors")]
    command += [str(tmp_path / "cases.json"), str(tmp_path / "comfy.safetensors")]
    done = subprocess.run(command, cwd=comfy_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    reference = load_file(str(tmp_path / "comfy.safetensors"))

    model = load_transformer(dit, dtype=torch.float32, device=torch.device("cpu")).eval()
    try:
        for name, case in CASES.items():
            settings = SamplerSettings(steps=case["steps"], cfg=case["cfg"], shift=case["shift"], seed=case["seed"])
            ours = sample_zimage(
                model,
                inputs[f"{name}.positive"],
                inputs[f"{name}.negative"],
                settings,
                latent_shape=(16, case["height"] // 8, case["width"] // 8),
                device=torch.device("cpu"),
            )
            theirs = from_comfy_latent(reference[name][0])
            assert ours.shape == theirs.shape, name
            error = float((ours.double() - theirs.double()).norm() / theirs.double().norm())
            print(f"{name}: relative error {error:.2e} against ComfyUI's KSampler")
            assert error <= TOLERANCE, f"{name}: relative error {error:.2e}"
            noise = torch.randn(
                (1, 16, case["height"] // 8, case["width"] // 8), generator=torch.Generator().manual_seed(case["seed"])
            )
            moved = float((ours - noise[0]).norm() / noise.norm())
            assert moved > 0.05, f"{name}: the sample is the starting noise; the parity would prove nothing"
    finally:
        del model
        gc.collect()
