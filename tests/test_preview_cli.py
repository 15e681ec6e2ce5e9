"""``python -m training previews``: encode prompts with the text-encoder file, train with them, decode the previews to
PNGs and a grid with the VAE file (tiny test encoders, CPU); users' mistakes end with exit code 2."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.encoder_fixtures import diffusers_to_flux, tiny_diffusers_vae, tiny_encoder_files
from tests.test_engine_runs import tiny_config, train_in_process
from training.__main__ import main
from training.engine.preview import load_prompt_features, read_preview, read_preview_events
from training.engine.preview_images import image_path
from training.model.flux_vae import FluxVAE


def write_vae_with_decoder(path):
    state = diffusers_to_flux(tiny_diffusers_vae(0).state_dict(), decoder=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_encode_train_decode(tmp_path):
    files = tiny_encoder_files(tmp_path / "comfy")
    prompts = tmp_path / "prompts.safetensors"
    encode = ["previews", "encode", str(prompts), "--text-encoder", str(files["text_encoder"])]
    encode += ["--tokenizer", str(files["tokenizer"]), "--device", "cpu", "--prompt", "a red cat", "--prompt", "a dog"]
    assert main(encode) == 0
    features = load_prompt_features(prompts, feature_dim=32)
    assert features.texts == ("a red cat", "a dog") and features.negative is not None

    config = tiny_config(tmp_path / "run", micro_batch=1, grad_accum=1)
    config["run"]["steps"] = 2
    config["preview"] = {"features": str(prompts), "steps": 2, "cfg": 2.0, "width": 32, "height": 32}
    train_in_process(copy.deepcopy(config))
    events = read_preview_events(tmp_path / "run")
    assert [e["step"] for e in events] == [0, 2]

    vae = write_vae_with_decoder(tmp_path / "ae.safetensors")
    decode = ["previews", "decode", str(tmp_path / "run"), "--vae", str(vae), "--device", "cpu"]
    assert main(decode) == 0
    expected = FluxVAE.load(vae, device=torch.device("cpu"), dtype=torch.float32, decoder=True).decode(
        torch.stack(read_preview(tmp_path / "run", events[-1]))
    )
    for prompt in range(2):
        with Image.open(image_path(tmp_path / "run", 2, prompt)) as image:
            assert image.size == (32, 32)
            pixels = torch.from_numpy(np.asarray(image.convert("RGB"))).float() / 255
        assert (pixels.movedim(-1, 0) - expected[prompt]).abs().max() <= 1 / 255 + 1e-6
    with Image.open(tmp_path / "run" / "previews" / "grid.png") as grid:
        assert grid.size[1] > 2 * 32  # two rows (steps 0 and 2)
    assert main(decode) == 0  # again: nothing new to decode, the grid is rewritten


def test_mistakes_exit_with_2(tmp_path):
    assert main(["previews", "decode", str(tmp_path / "nowhere"), "--vae", str(tmp_path / "ae.safetensors")]) == 2
    (tmp_path / "run").mkdir()
    assert main(["previews", "decode", str(tmp_path / "run"), "--vae", str(tmp_path / "ae.safetensors")]) == 2
    missing = ["previews", "encode", str(tmp_path / "p.safetensors"), "--text-encoder", str(tmp_path / "x")]
    assert main([*missing, "--prompt", "a"]) == 2
