"""Pack Dataset on a small image folder with ComfyUI-shaped VAE and CLIP fakes built from the test encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_nodes_support import FakeInterrupt, install_fake_comfy, pack_module

from training.data.encoders import TestLatentEncoder, TestTextEncoder

pack_node = pack_module("nodes.pack_node")
encoders = pack_module("nodes.encoders")


class FakeVAE:
    """ComfyUI's VAE interface: encode(IMAGE [B, H, W, C] in 0..1) -> raw latents; first_stage_model is a Module."""

    def __init__(self) -> None:
        self.inner = TestLatentEncoder(seed=1)
        self.first_stage_model = self.inner.conv
        self.calls = 0

    def encode(self, images_bhwc: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert images_bhwc.ndim == 4 and images_bhwc.shape[-1] == 3
        return self.inner.encode(images_bhwc.movedim(-1, 1))


class FakeCLIP:
    """ComfyUI's CLIP interface: tokenize + encode_from_tokens(return_dict=True) -> cond [1, L, D] and a mask."""

    def __init__(self, feature_dim: int = 32, padding: int = 3) -> None:
        self.inner = TestTextEncoder(feature_dim=feature_dim)
        self.cond_stage_model = torch.nn.Linear(2, 2)
        self.padding = padding

    def tokenize(self, text: str):
        return {"text": text}

    def encode_from_tokens(self, tokens, return_dict=False):
        features = self.inner.encode([tokens["text"]])[0]
        padded = torch.cat([features, torch.zeros(self.padding, features.shape[1])])[None]
        mask = torch.cat([torch.ones(len(features)), torch.zeros(self.padding)])[None].long()
        return {"cond": padded, "pooled_output": None, "attention_mask": mask}


def make_images(folder, count=5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        size = ((96, 64), (64, 96), (80, 80))[index % 3]
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"caption {index}")
    (folder / "broken.png").write_bytes(b"not an image")


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    fake = install_fake_comfy(tmp_path, monkeypatch)
    make_images(fake.folders["input"] / "photos")
    return fake


def settings(**overrides):
    values = {name: widget.default for name, widget in pack_node.WIDGETS.items()}
    values.update(image_folder="photos", dataset_name="photos_set", resolution=256, samples_per_shard=2)
    values.update(overrides)
    return values


def test_pack_with_vae_and_clip_writes_shards_and_reports_skips(comfy):
    vae, clip = FakeVAE(), FakeCLIP()
    output = pack_node.PackDataset().pack(vae=vae, clip=clip, unique_id="7", **settings(too_small="upscale"))
    dataset, report = output["result"]
    assert output["ui"]["text"] == [report]
    assert dataset.path == (comfy.folders["whetstone_datasets"] / "photos_set").resolve()
    assert dataset.samples == 5 and dataset.skipped == 1
    assert dataset.latent_encoder.startswith("comfyui-vae:") and dataset.text_encoder.startswith("comfyui-clip:")
    assert "broken.png" in report
    manifest = json.loads((dataset.path / "manifest.json").read_text())
    assert manifest["samples"] == 5
    assert vae.calls > 0
    assert comfy.progress[-1] == (6, 6)


def test_latents_are_in_the_flux_process_in_format(comfy):
    vae = FakeVAE()
    images = torch.rand(1, 3, 64, 64)
    latents = encoders.ComfyLatentEncoder(vae).encode(images)
    expected = (vae.inner.encode(images) - 0.1159) * 0.3611
    torch.testing.assert_close(latents, expected)


def test_text_features_drop_the_padding(comfy):
    clip = FakeCLIP(padding=4)
    encoder = encoders.ComfyTextEncoder(clip)
    features = encoder.encode(["hello", "a longer caption"])
    assert [f.shape[0] for f in features] == [6, 17]  # BOS + characters, padding removed
    assert encoder.feature_dim == 32


def test_vae_with_wrong_channels_is_refused():
    class SDVae(FakeVAE):
        def encode(self, images_bhwc):
            return torch.zeros(images_bhwc.shape[0], 4, 8, 8)

    with pytest.raises(ValueError, match="16-channel"):
        encoders.ComfyLatentEncoder(SDVae()).encode(torch.rand(1, 3, 64, 64))


def test_pack_without_vae_stores_images(comfy):
    dataset, _ = pack_node.PackDataset().pack(**settings(too_small="upscale"))["result"]
    manifest = json.loads((dataset.path / "manifest.json").read_text())
    assert manifest["settings"]["store_image"] is True


def test_cancel_stops_packing_and_rerun_resumes(comfy):
    comfy.interrupt_after_progress = 4  # after the first shard (2 samples) is complete
    with pytest.raises(FakeInterrupt):
        pack_node.PackDataset().pack(vae=FakeVAE(), **settings(too_small="upscale"))
    dataset, report = pack_node.PackDataset().pack(vae=FakeVAE(), **settings(too_small="upscale"))["result"]
    assert dataset.samples == 5
    assert "reused" in report


def test_links_leaving_the_image_folder_are_never_followed(comfy, tmp_path):
    # Issue 13 defect 4: a link to an image outside ComfyUI's folders (or merely outside the image folder) was packed.
    photos = comfy.folders["input"] / "photos"
    secret = tmp_path / "private"
    secret.mkdir()
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(secret / "secret.png")
    (secret / "secret.txt").write_text("private words")
    Image.fromarray(np.zeros((80, 80, 3), np.uint8)).save(comfy.folders["output"] / "other.png")
    (photos / "secret.png").symlink_to(secret / "secret.png")
    (photos / "secret.txt").symlink_to(secret / "secret.txt")
    (photos / "other.png").symlink_to(comfy.folders["output"] / "other.png")
    (photos / "private_folder").symlink_to(secret)
    dataset, report = pack_node.PackDataset().pack(**settings(too_small="upscale"))["result"]
    assert dataset.samples == 5  # the five real images only
    report_json = json.loads((dataset.path / "report.json").read_text())
    skipped = {entry["path"]: entry["kind"] for entry in report_json["skipped"]}
    assert skipped == {"broken.png": "unreadable", "other.png": "link_outside", "private_folder": "link_outside",
                       "secret.png": "link_outside"}  # fmt: skip
    assert "private words" not in report and "private words" not in json.dumps(report_json)
    assert "symbolic links that leave the folder: copy the files into the folder" in report
    assert "follow_external_links" not in report  # the node has no such option and never follows
