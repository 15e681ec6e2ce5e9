"""A full fine-tune's result: one ComfyUI diffusion-model file at ``run.model_path`` (the key layout of ComfyUI's
UNETLoader / ``load_diffusion_model``: unprefixed, fused qkv), holding the trained weights, which diffusers'
``ZImageTransformer2DModel.from_single_file`` loads too and computes the same output with."""

from __future__ import annotations

import pytest
import torch
from model_helpers import diffusers_forward, diffusers_twin, relative_error
from safetensors import safe_open

from tests.test_engine_runs import tiny_config, train_in_process
from training.engine.build import random_model
from training.model.config import preset
from training.model.weights import load_transformer, read_header
from training.model.zimage import ZImageTransformer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full")
    config = tiny_config(run_dir / "run", "full", micro_batch=2, grad_accum=1, steps=3, save_state=False)
    config["run"]["model_path"] = str(run_dir / "diffusion_models" / "whetstone" / "tuned.safetensors")
    config["optim"] = {"lr": 1e-2}
    train_in_process(config)
    return run_dir / "diffusion_models" / "whetstone" / "tuned.safetensors"


def test_the_model_goes_to_run_model_path_in_comfyuis_key_layout(fine_tuned):
    header = read_header(fine_tuned)
    reference = ZImageTransformer(preset("tiny")).state_dict()
    assert header.keys() == reference.keys()  # the names ComfyUI's Lumina2/Z-Image module loads, no prefix
    assert all(dtype == "BF16" for dtype, _ in header.values())
    assert {name: tuple(shape) for name, (_, shape) in header.items()} == {
        name: tuple(t.shape) for name, t in reference.items()
    }
    assert any(name.endswith(".attention.qkv.weight") for name in header)  # fused, as ComfyUI keeps it
    with safe_open(str(fine_tuned), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "whetstone.zimage-full" and (metadata["steps"], metadata["mode"]) == ("3", "full")
    assert not (fine_tuned.parents[2] / "run" / "model.safetensors").exists()


def test_the_file_holds_the_trained_weights(fine_tuned):
    initial = random_model(preset("tiny"), dtype=torch.float32, device=CPU, seed=0).state_dict()
    tuned = load_transformer(fine_tuned, dtype=torch.float32).state_dict()
    changed = [name for name in tuned if not torch.equal(tuned[name], initial[name].bfloat16().float())]
    assert len(changed) > 0.9 * len(tuned), f"only {len(changed)} of {len(tuned)} tensors changed"


def test_diffusers_loads_the_file_and_computes_the_same_output(fine_tuned, tmp_path):
    from diffusers import ZImageTransformer2DModel

    ours = load_transformer(fine_tuned, dtype=torch.float32).eval()
    config_dir = tmp_path / "transformer"
    diffusers_twin(ours).save_config(config_dir)  # the tiny architecture's config.json (no weights)
    loaded = ZImageTransformer2DModel.from_single_file(
        str(fine_tuned), config=str(tmp_path), subfolder="transformer", torch_dtype=torch.float32
    ).eval()
    generator = torch.Generator().manual_seed(3)
    cfg = preset("tiny")
    latents = torch.randn(2, cfg.in_channels, 8, 6, generator=generator)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=generator) for n in (5, 19)]
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        expected = ours(latents, sigma, captions)
        got = diffusers_forward(loaded, latents, sigma, captions)
    assert relative_error(got, expected) <= 1e-5
