"""The README's CLI walk-through, run as a user runs it: a photo folder -> `pack` with the VAE and text encoder files of
a ComfyUI installation -> `inspect` -> `train` -> a LoRA file. Real subprocesses of `python -m training`, on the CPU,
with tiny random-init encoders in ComfyUI's layout (models/vae, models/text_encoders, comfy/text_encoders/
qwen25_tokenizer found on its own) and the tiny model preset. Also: raw-image shards say how to make them trainable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.data_fixtures import make_dataset
from tests.encoder_fixtures import tiny_encoder_files
from training.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    return subprocess.run(
        [sys.executable, "-m", "training", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_photo_folder_to_lora_through_the_cli(tmp_path, capsys):
    comfy = tmp_path / "ComfyUI"
    files = tiny_encoder_files(comfy)
    photos = tmp_path / "photos"
    make_dataset(photos, 6)
    shards = tmp_path / "shards"
    packed = cli(
        "pack", str(photos), str(shards), "--resolution", "64", "--samples-per-shard", "4",
        "--vae", str(files["vae"]), "--text-encoder", str(files["text_encoder"]), "--device", "cpu",
        "--encode-batch", "4",
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr
    assert "packed 6 samples into 2 shards" in packed.stdout and "note:" not in packed.stdout
    assert "qwen25_tokenizer" in packed.stderr  # the tokenizer was found in the ComfyUI folder, and the log says so
    assert "pack [" in packed.stderr and "img/s" in packed.stderr  # progress lines with the rate
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["contents"]["latent_encoder"].startswith("flux-vae:")
    assert manifest["contents"]["text_encoder"].startswith("qwen3:") and manifest["contents"]["image_format"] is None

    assert main(["inspect", str(shards), "--samples", "1"]) == 0  # in-process: one interpreter start less
    inspected = capsys.readouterr().out
    assert "latent=[16, " in inspected and "caption_features=[" in inspected and "note:" not in inspected

    lora = tmp_path / "my_lora.safetensors"
    config = {
        "mode": "lora",
        "run": {"output_dir": str(tmp_path / "run"), "lora_path": str(lora), "steps": 3, "micro_batch": 2},
        "model": {"preset": "tiny", "dtype": "fp32"},
        "lora": {"rank": 4},
        "data": {"shards": str(shards), "num_workers": 0, "shuffle_buffer": 8},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    trained = cli("train", "--config", str(tmp_path / "config.json"), timeout=240)
    assert trained.returncode == 0, trained.stderr[-3000:]
    weights = load_file(lora)
    assert weights and all(name.startswith("diffusion_model.") for name in weights)


def test_raw_image_shards_name_the_fix(tmp_path, capsys, caplog):
    photos = tmp_path / "photos"
    make_dataset(photos, 3)
    shards = tmp_path / "raw"
    assert main(["pack", str(photos), str(shards), "--resolution", "64"]) == 0
    assert "these shards hold raw images; train needs encoded shards: repack" in capsys.readouterr().out
    assert main(["inspect", str(shards)]) == 0
    shown = capsys.readouterr().out
    assert "latent encoder: None" in shown and "train needs encoded shards" in shown and "--vae" in shown
    config = {
        "run": {"output_dir": str(tmp_path / "run"), "steps": 1},
        "model": {"preset": "tiny", "dtype": "fp32"},
        "data": {"shards": str(shards), "num_workers": 0},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "config.json")]) == 2
    assert "hold no latents and no caption features" in caplog.text and "--text-encoder" in caplog.text
