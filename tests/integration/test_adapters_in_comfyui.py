"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH): every adapter type the engine saves (LoRA, DoRA, LoKr, LoHa) loads
with 0 unloaded keys, the Load Trained LoRA node's key check accepts it, and every weight ComfyUI patches (fused qkv
from its to_q/to_k/to_v slices included) equals the engine's own float32 merge within 1e-6 of the weight's size.

The work runs in ComfyUI's Python (comfy_adapter_check.py: it imports comfy and our engine, which needs peft there)
on the smallest Z-Image ComfyUI detects (model_fixtures: dim 3840, one main layer, 2+2 refiners)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from integration.model_fixtures import DIT_FILE, dit_folder

from training.vocabulary import ADAPTER_TYPES

pytestmark = pytest.mark.comfyui

#: float32 on both sides; measured: 0 for LoRA, LoKr and LoHa (the same operations), 2.1e-7 for DoRA.
TOLERANCE = 1e-6
TIMEOUT_S = 2700  # 4 adapter types on two shared CPU cores: 10 min measured alone, 25+ min under load
REPO_ROOT = Path(__file__).resolve().parents[2]


def comfy_python(comfy_path: Path) -> str:
    """As the server fixture picks it: COMFYUI_PYTHON, else ComfyUI's venv (which must have peft, as the pack needs)."""
    venv_python = comfy_path / "venv" / "bin" / "python"
    return os.environ.get("COMFYUI_PYTHON") or str(venv_python)


def test_every_adapter_type_patches_comfyui_like_the_engine_merges(tmp_path):
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("COMFYUI_PATH is not set (see ../shared/docs/comfyui.md, 'Running a real ComfyUI')")
    comfy_path = Path(comfy_path)
    script = Path(__file__).resolve().parent / "comfy_adapter_check.py"
    out = tmp_path / "result.json"
    dit = dit_folder() / DIT_FILE
    command = [comfy_python(comfy_path), str(script), str(REPO_ROOT), str(dit), str(tmp_path), str(out), *ADAPTER_TYPES]
    result = subprocess.run(command, cwd=comfy_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(ADAPTER_TYPES)
    for adapter, found in results.items():
        print(adapter, found)
        assert found["unloaded"] == [], adapter
        assert found["node_accepts"], adapter
        # one patch per file module (q, k and v are three on the fused qkv), every one applied to a weight
        assert found["patches"] == found["applied"] > found["engine_layers"], adapter
        assert found["compared"] == found["comfy_patched_weights"] == found["engine_layers"], adapter
        assert found["max_relative_error"] <= TOLERANCE, (adapter, found["worst_key"])
        assert found["smallest_adapter_change"] > 1e-3, adapter  # every weight really changed
