"""`python -m training pack --vae --text-encoder` stores what ComfyUI's own encoders give (opt-in: COMFYUI_PATH).

The same files a ComfyUI user has, at test size: the 16-channel Flux VAE at its real widths and a 3-layer Qwen3-4B
(widths, vocabulary and key names of qwen_3_4b.safetensors), random init, written with ComfyUI's own classes
(model_fixtures.comfy_side_folder, cached). Our CLI packs a photo folder with them (PNG images kept, float32
tensors); comfy_encode.py, under ComfyUI's Python, encodes the stored images and captions with ComfyUI's VAE and
CLIP loaders. Latents and caption features must agree within 1e-3 relative (the tokenizer: exactly), for captions
that exercise ComfyUI's prompt handling. A bf16 pack (the default) must match ComfyUI's features rounded to bf16,
as the Pack Dataset node stores them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from integration.model_fixtures import TEXT_ENCODER_FILE, VAE_FILE, comfy_side_folder
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

pytestmark = pytest.mark.comfyui

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-3
CAPTIONS = [
    "a photo of a red cat on a sofa",
    "",
    "Ünïcödé café — 日本語のテキスト, emoji 😀, numbers 12345",
    r"escaped \(parentheses\) and (weights:1.3) stay text",
    "two lines\nof text\r\n\twith tabs",
    "a picture embedding:my_style in watercolour",
    "cut here<|endoftext|>never seen",
    "special <|im_end|> token inside, then more words " * 8,
]


@pytest.fixture(scope="module")
def comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set (see ../shared/docs/comfyui.md, 'Running a real ComfyUI')")
    comfy_path = Path(path)
    python = os.environ.get("COMFYUI_PYTHON") or str(comfy_path / "venv" / "bin" / "python")
    return comfy_path, python


def write_photos(folder: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [(192, 128), (128, 192), (160, 160), (256, 128)]
    for index, caption in enumerate(CAPTIONS):
        width, height = sizes[index % len(sizes)]
        pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"photo{index:02d}.png")
        (folder / f"photo{index:02d}.txt").write_text(caption, encoding="utf-8")


def pack(photos: Path, shards: Path, files: Path, comfy_path: Path, storage_dtype: str) -> None:
    command = [
        sys.executable, "-m", "training", "pack", str(photos), str(shards), "--resolution", "128",
        "--too-small", "upscale", "--vae", str(files / VAE_FILE), "--text-encoder", str(files / TEXT_ENCODER_FILE),
        "--tokenizer", str(comfy_path / "comfy" / "text_encoders" / "qwen25_tokenizer"), "--device", "cpu",
        "--encode-batch", "3", "--store-images", "--image-format", "png", "--storage-dtype", storage_dtype,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def shard_tensors(shards: Path) -> dict[str, dict[str, torch.Tensor]]:
    manifest = json.loads((shards / "manifest.json").read_text())
    out = {}
    for shard in manifest["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                if extension == "safetensors":
                    out[key] = load_safetensors(tar.extractfile(member).read())
    return out


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).norm() / theirs.float().norm().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def packed(comfy, tmp_path_factory):
    comfy_path, python = comfy
    files = comfy_side_folder(python, comfy_path)
    root = tmp_path_factory.mktemp("parity")
    write_photos(root / "photos")
    pack(root / "photos", root / "fp32", files, comfy_path, "float32")
    reference = root / "comfy.safetensors"
    script = [python, str(HERE / "comfy_encode.py"), str(root / "fp32"), str(files / VAE_FILE)]
    done = subprocess.run(
        [*script, str(files / TEXT_ENCODER_FILE), str(reference)],
        cwd=comfy_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return root, files, load_file(reference)


def test_latents_and_caption_features_equal_comfyui(packed):
    root, _, reference = packed
    ours = shard_tensors(root / "fp32")
    assert len(ours) == len(CAPTIONS)
    for key, tensors in ours.items():
        latent, expected_latent = tensors["latent"], reference[f"{key}.latent"]
        assert latent.shape == expected_latent.shape and latent.dtype == torch.float32, key
        assert relative(latent, expected_latent) <= TOLERANCE, (key, relative(latent, expected_latent))
        features, expected = tensors["caption_features"], reference[f"{key}.caption"]
        assert features.shape == expected.shape, (key, features.shape, expected.shape)  # same tokens kept
        assert relative(features, expected) <= TOLERANCE, (key, relative(features, expected))
    empty = load_file(root / "fp32" / "empty_caption.safetensors")["caption_features"]
    assert empty.shape == reference["__empty__.caption"].shape
    assert relative(empty, reference["__empty__.caption"]) <= TOLERANCE


def test_default_bf16_pack_matches_what_the_node_stores(packed, comfy):
    root, files, reference = packed
    photos = root / "photos_again"
    photos.mkdir()
    for path in (root / "photos").iterdir():
        (photos / path.name).write_bytes(path.read_bytes())
    pack(photos, root / "bf16", files, comfy[0], "bfloat16")
    ours = shard_tensors(root / "bf16")
    for key, tensors in ours.items():
        assert tensors["latent"].dtype == torch.bfloat16
        for name, suffix in (("latent", "latent"), ("caption_features", "caption")):
            expected = reference[f"{key}.{suffix}"].to(torch.bfloat16)
            assert relative(tensors[name], expected) <= TOLERANCE, (key, name)


def test_token_ids_equal_comfyui_tokenizer(comfy, tmp_path):
    from training.model.qwen_tokenizer import ZImageTokenizer

    comfy_path, python = comfy
    captions = CAPTIONS + ["x\nembedding:foo, bar\nbaz", "embedding:lead word", "a  embedding:x", "trailing  \n"]
    (tmp_path / "captions.json").write_text(json.dumps(captions), encoding="utf-8")
    done = subprocess.run(
        [python, str(HERE / "comfy_tokenize.py"), str(tmp_path / "captions.json"), str(tmp_path / "ids.json")],
        cwd=comfy_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    expected = json.loads((tmp_path / "ids.json").read_text())
    ours = ZImageTokenizer.load(comfy_path / "comfy" / "text_encoders" / "qwen25_tokenizer")
    assert [ours.token_ids(caption) for caption in captions] == expected
