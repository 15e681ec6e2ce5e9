"""bench/bench_scaleout.py's random-init encoders (issue 19: a GPU pack throughput run without downloadable weights).

The full sizes are checked against independent definitions of the two models (diffusers' AutoencoderKL with the Flux
VAE's config, transformers' Qwen3 with Qwen3-4B's) and against the packer's own readers, without writing 8 GB; the
tiny sizes are written, read back by the packer's encoders, and run through the whole benchmark on the CPU (smoke).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.random_encoders import SIZES, qwen3_shapes, random_tensors, vae_encoder_shapes, write_random_encoders
from training.model.encoder_files import load_tensors, read_file_sources
from training.model.flux_vae import FluxEncoderShape, FluxLatentEncoder
from training.model.qwen3 import Qwen3Shape, Qwen3TextEncoder

REPO = Path(__file__).resolve().parents[1]
FULL = SIZES["full"]


def test_the_full_vae_is_the_flux_autoencoders_encoder():
    from diffusers import AutoencoderKL
    from encoder_fixtures import diffusers_to_flux

    with torch.device("meta"):
        flux = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )  # fmt: skip  (black-forest-labs/FLUX.1-dev vae/config.json)
    expected = {name: tuple(t.shape) for name, t in diffusers_to_flux(flux.state_dict()).items()}
    shapes = vae_encoder_shapes(FULL.vae_channels, FULL.vae_res_blocks)
    assert shapes == expected
    assert FluxEncoderShape.from_file(shapes, "ae") == FluxEncoderShape(
        channels=(128, 256, 512, 512), res_blocks=2, z_channels=16
    )
    assert 34e6 < sum(math.prod(shape) for shape in shapes.values()) < 35e6


def test_the_full_text_encoder_is_qwen3_4b():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )  # fmt: skip  (Qwen/Qwen3-4B config.json)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if not name.startswith("lm_head")}
    shapes = qwen3_shapes(FULL.text)
    assert shapes == expected
    assert Qwen3Shape.from_file(shapes, "qwen_3_4b") == FULL.text
    assert sum(math.prod(shape) for shape in shapes.values()) == 4_022_468_096  # Qwen3-4B: 4.0 B, tied embeddings


def test_tiny_random_encoders_round_trip_through_the_packers_readers(tmp_path):
    files = write_random_encoders(tmp_path, "tiny", device=torch.device("cpu"), seed=3)
    sizes = SIZES["tiny"]
    for path, shapes, dtype, seed in (
        (files["vae"], vae_encoder_shapes(sizes.vae_channels, sizes.vae_res_blocks), torch.float32, 3),
        (files["text_encoder"], qwen3_shapes(sizes.text), torch.bfloat16, 4),
    ):
        sources = read_file_sources(path, "random encoder")
        stored = load_tensors(sources, {name: name for name in sources}, device=torch.device("cpu"))
        drawn = dict(random_tensors(shapes, dtype=dtype, device=torch.device("cpu"), seed=seed))
        assert stored.keys() == drawn.keys()
        assert all(torch.equal(stored[name], drawn[name]) for name in drawn), path.name
    latents = FluxLatentEncoder(files["vae"], device="cpu").encode(torch.rand(1, 3, 64, 48))
    assert latents.shape == (1, 16, 8, 6) and torch.isfinite(latents).all()
    text = Qwen3TextEncoder(files["text_encoder"], tokenizer=files["tokenizer"], device="cpu")
    (features,) = text.encode(["a photo of a red cat"])
    assert features.shape[1] == sizes.text.hidden and features.shape[0] > 5 and torch.isfinite(features).all()
    assert features.std() > 0.1, "random weights must still make varied features"


def test_the_benchmark_runs_with_random_encoders_on_the_cpu(tmp_path):
    """The lead's GPU command with --random-encoders full, here at the tiny size on the CPU: every step runs."""
    command = [sys.executable, str(REPO / "bench" / "bench_scaleout.py"), "--images", "4", "--ranks", "1",
               "--device", "cpu", "--random-encoders", "tiny", "--threads", "1"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "bench_scaleout.json").read_text())
    assert (results["encoders"], results["resolution"], results["images"]) == ("tiny", 256, 4)
    assert [entry["identical_to_first"] for entry in results["pack"]] == [True]
    timed = results["timed_pack"]
    assert timed["img_per_s"] == 4 / timed["pack_s"] > 0
    assert 0 < timed["vae_share"] < 1 and 0 < timed["text_encoder_share"] < 1
    assert timed["vae_share"] + timed["text_encoder_share"] <= 1
    assert results["loader"]["samples"] == 4
    assert "img/s" in done.stdout and "text encoder" in done.stdout


def test_the_benchmark_refuses_mixed_encoder_flags(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "bench_scaleout.py"), "--vae", str(tmp_path / "ae.safetensors"),
               "--random-encoders", "full"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 2 and "--random-encoders" in done.stderr and "Traceback" not in done.stderr
