"""In a real ComfyUI 0.8 (opt-in: COMFYUI_PATH): a full fine-tune's file, written by the engine's own
``save_full_model`` where the Train node puts it (diffusion_models/whetstone/<run>.safetensors), loads through
ComfyUI's diffusion-model loader with 0 missing and 0 unexpected keys (Load Trained Model), holds exactly the weights
that were saved, and samples.

The fine-tune is the smallest Z-Image ComfyUI recognises (dim 3840, one main layer) with every weight moved off its
random init: training it for real needs ~16 GB of fp32 state on the CPU, more than the suite's machines have; the
Train node's full-mode path to this file is tested in tests/test_nodes_train.py on the tiny model."""

from __future__ import annotations

import subprocess

import pytest
import torch
from integration.model_fixtures import DIT_FILE, dit_folder
from PIL import Image

from training.engine.distributed import DistInfo
from training.engine.results import save_full_model
from training.model.weights import load_transformer

pytestmark = pytest.mark.comfyui

TIMEOUT_S = 300
FINE_TUNE = "whetstone/ft.safetensors"
#: Run under ComfyUI's Python: ComfyUI's loader, then every loaded weight against the file (exact, bf16).
COMPARE = """
import sys
from comfy.cli_args import args
args.cpu = True
import comfy.sd, torch
from safetensors.torch import load_file
patcher = comfy.sd.load_diffusion_model(sys.argv[1])
loaded = patcher.model.diffusion_model.state_dict()
saved = load_file(sys.argv[1])
assert loaded.keys() == saved.keys(), (sorted(loaded.keys() - saved.keys())[:5], sorted(saved.keys() - loaded.keys())[:5])
different = [k for k in saved if not torch.equal(loaded[k].to(saved[k].dtype), saved[k])]
assert not different, different[:5]
print(f"ok {len(saved)} tensors")
"""


@pytest.fixture(scope="module")
def fine_tune(comfy_server, zimage_models):
    model = load_transformer(dit_folder() / DIT_FILE, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype), alpha=0.01)
    path = comfy_server.base / "models" / "diffusion_models" / FINE_TUNE
    dist_info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    save_full_model(model, path, dist_info=dist_info, metadata={"steps": "1", "mode": "full"})
    del model
    return path


def test_comfyuis_loader_takes_every_key_and_weight(comfy_server, fine_tune):
    result = subprocess.run(
        [comfy_server.python, "-c", COMPARE, str(fine_tune)],
        cwd=comfy_server.comfy_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().startswith("ok ")


def test_load_trained_model_samples_with_the_fine_tune(comfy_server, zimage_models, fine_tune):
    prompt = {
        "model": {"class_type": "WhetstoneLoadTrainedModel", "inputs": {"model_name": FINE_TUNE}},
        "model_report": {"class_type": "PreviewAny", "inputs": {"source": ["model", 1]}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": zimage_models["vae"]}},
        "clip": {
            "class_type": "WhetstoneTestSmallQwen3Loader",
            "inputs": {"clip_name": zimage_models["text_encoders"]},
        },
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": "a test pattern", "clip": ["clip", 0]}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["positive", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["model", 0],
                "seed": 0,
                "steps": 2,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["positive", 0],
                "negative": ["negative", 0],
                "latent_image": ["latent", 0],
                "denoise": 1.0,
            },
        },  # fmt: skip
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "full_ft"}},
    }
    outputs = comfy_server.run(prompt, TIMEOUT_S)["outputs"]
    report = outputs["model_report"]["text"][0]
    assert report == "ft.safetensors: loaded with ComfyUI's diffusion-model loader, 0 missing and 0 unexpected keys"
    (image,) = outputs["save"]["images"]
    with Image.open(comfy_server.base / "output" / image["subfolder"] / image["filename"]) as saved:
        assert saved.size == (64, 64)
