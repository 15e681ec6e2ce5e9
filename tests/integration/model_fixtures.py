"""The smallest model files a real ComfyUI loads as Z-Image, built once and cached across test runs.

- `zimage_1layer.safetensors`: our Z-Image at the real width (dim 3840, which ComfyUI's detection needs) with one main
  layer and the 2+2 refiners, random init, ComfyUI layout, bf16 (about 1.8 GB).
- `ae.safetensors` and `qwen3_4b_tiny.safetensors`: see comfy_weights.py (written with ComfyUI's own classes, so
  that script runs under ComfyUI's Python).

The cache lives in WHETSTONE_TEST_CACHE (default: <tmp>/whetstone-integration-cache), one folder per builder, named by
a hash of what builds it, so a changed builder rebuilds and a stale folder is never reused.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from training.engine.build import random_model
from training.model.config import ZImageConfig
from training.model.weights import save_weights

HERE = Path(__file__).resolve().parent
DIT_FILE = "zimage_1layer.safetensors"
VAE_FILE = "ae.safetensors"
TEXT_ENCODER_FILE = "qwen3_4b_tiny.safetensors"
DIT_CONFIG = ZImageConfig(n_layers=1)  # dim 3840 and 2+2 refiners: the published widths
DONE = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get("WHETSTONE_TEST_CACHE") or Path(tempfile.gettempdir()) / "whetstone-integration-cache")


def _cached(name: str, recipe: str, build: Callable[[Path], None]) -> Path:
    """The folder `build` filled for this recipe; built into a scratch folder and renamed, so a crash leaves nothing."""
    folder = cache_root() / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (folder / DONE).is_file():
        return folder
    cache_root().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root()))
    try:
        build(scratch)
        (scratch / DONE).write_text(recipe)
        scratch.rename(folder)  # fails if a concurrent run got there first: its folder is as good
    except OSError:
        if not (folder / DONE).is_file():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _build_dit(folder: Path) -> None:
    model = random_model(DIT_CONFIG, dtype=torch.bfloat16, device=torch.device("cpu"), seed=0)
    save_weights(model, folder / DIT_FILE, layout="comfy", metadata={"whetstone_test": "random init"})
    del model
    gc.collect()


def dit_folder() -> Path:
    recipe = f"{DIT_CONFIG!r}\n{inspect.getsource(_build_dit)}\ntorch {torch.__version__}"
    return _cached("zimage-dit", recipe, _build_dit)


def comfy_side_folder(comfy_python: str, comfy_path: Path) -> Path:
    script = HERE / "comfy_weights.py"
    recipe = script.read_text(encoding="utf-8")

    def build(folder: Path) -> None:
        subprocess.run([comfy_python, str(script), str(folder)], cwd=comfy_path, check=True, timeout=600)

    return _cached("comfy-vae-te", recipe, build)


def install_models(models_dir: Path, comfy_python: str, comfy_path: Path) -> dict[str, str]:
    """Link the cached files into a ComfyUI models folder; returns {folder name: file name}."""
    placed = {
        "diffusion_models": dit_folder() / DIT_FILE,
        "vae": comfy_side_folder(comfy_python, comfy_path) / VAE_FILE,
        "text_encoders": comfy_side_folder(comfy_python, comfy_path) / TEXT_ENCODER_FILE,
    }
    for folder_name, source in placed.items():
        target = models_dir / folder_name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(source)
    return {folder_name: source.name for folder_name, source in placed.items()}
