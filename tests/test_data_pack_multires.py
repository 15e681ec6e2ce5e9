"""Multi-resolution packs: one shard set holding each image at every resolution it covers, counted per
(resolution, bucket), deterministic and resumable, with the sizes each image was kept at in the report."""

from __future__ import annotations

import json

import pytest

from tests.data_fixtures import make_dataset, shard_bytes
from training.data.batches import read_safetensors
from training.data.encoders import TestLatentEncoder, TestTextEncoder
from training.data.pack import PackConfig, PackInterrupted, pack_dataset
from training.data.samples import LATENT_KEY, TENSORS_EXTENSION
from training.data.shards import read_samples
from training.data.stats import read_dataset_stats, resolution_buckets

#: 144x96 and 96x144 cover the 64 and 96 px buckets; 72x72 only 64 px; 192x192 all three.
SIZES = ((144, 96), (96, 144), (72, 72), (192, 192))


def _config(tmp_path, output="out", **overrides) -> PackConfig:
    settings = {
        "input_dir": tmp_path / "in",
        "output_dir": tmp_path / output,
        "resolution": (96, 64, 128),
        "store_image": True,
    }
    return PackConfig(**(settings | overrides))


def _manifest(result) -> dict:
    return json.loads(result.manifest_path.read_text(encoding="utf-8"))


def test_images_stored_per_resolution_they_cover_and_counted_per_bucket(tmp_path):
    make_dataset(tmp_path / "in", 8, sizes=SIZES)
    result = pack_dataset(_config(tmp_path, samples_per_shard=5))
    manifest = _manifest(result)
    assert manifest["settings"]["resolution"] == [64, 96, 128]  # sorted
    # 8 images: 2 of each size; 128 px keeps only the 192x192 ones, 96 px all but the 72x72 ones
    per_resolution = {r: sum(b.values()) for r, b in manifest["resolutions"].items()}
    assert per_resolution == {"64": 8, "96": 6, "128": 2}
    assert manifest["samples"] == 16 and sum(manifest["buckets"].values()) == 16
    assert manifest["resolutions"]["128"] == {"128x128": 2}
    samples = list(read_samples([result.output_dir / s.name for s in result.shards]))
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["__key__"].endswith(f"_r{meta['resolution']}")
        assert meta["bucket"] in manifest["resolutions"][str(meta["resolution"])]
    # one image's sizes never straddle two shards: each shard ends after an input's last size
    first_shard = list(read_samples([result.output_dir / result.shards[0].name]))
    assert len(first_shard) >= 5 and result.shards[0].samples == len(first_shard)
    sources = [json.loads(s["json"])["source"] for s in samples]
    assert all(sources.count(src) == len([1 for s in first_shard if json.loads(s["json"])["source"] == src])
               for src in {json.loads(s["json"])["source"] for s in first_shard})  # fmt: skip
    report = json.loads(result.report_path.read_text(encoding="utf-8"))
    assert report["images_per_resolution"] == {"64": 8, "96": 6, "128": 2}
    kept = {entry["path"]: entry["resolutions"] for entry in report["sizes"]}
    assert kept["img002.png"] == [64] and kept["img003.png"] == [64, 96, 128] and kept["img000.png"] == [64, 96]
    notes = [n for n in report["notes"] if n["kind"] == "fewer_sizes"]
    by_path = {n["path"]: n["note"] for n in notes}
    assert len(notes) == 6 and by_path["img002.png"] == "kept at 64 px only: smaller than its bucket at 96, 128 px"
    stats = read_dataset_stats(result.output_dir)
    assert stats.resolutions[128] == {(128, 128): 2} and sum(stats.resolutions[64].values()) == 8


def test_upscale_keeps_every_image_at_every_resolution(tmp_path):
    make_dataset(tmp_path / "in", 4, sizes=SIZES)
    result = pack_dataset(_config(tmp_path, too_small="upscale"))
    per_resolution = {r: sum(b.values()) for r, b in _manifest(result)["resolutions"].items()}
    assert per_resolution == {"64": 4, "96": 4, "128": 4}


def test_image_too_small_for_every_resolution_is_skipped(tmp_path):
    make_dataset(tmp_path / "in", 3, sizes=((32, 32), (192, 192)))
    result = pack_dataset(_config(tmp_path))
    report = json.loads(result.report_path.read_text(encoding="utf-8"))
    assert [s["path"] for s in report["skipped"]] == ["img000.png", "img002.png"]
    assert report["skipped"][0]["kind"] == "too_small" and "64x64" in report["skipped"][0]["reason"]


def test_encoded_multires_pack_stores_latents_per_resolution_deterministically(tmp_path):
    make_dataset(tmp_path / "in", 5, sizes=SIZES)
    encoders = {"latent_encoder": TestLatentEncoder(), "text_encoder": TestTextEncoder()}
    first = pack_dataset(_config(tmp_path, "a", samples_per_shard=3, num_threads=1), **encoders)
    second = pack_dataset(_config(tmp_path, "b", samples_per_shard=3, num_threads=2, encode_batch=4), **encoders)
    assert shard_bytes(first.output_dir).keys() == shard_bytes(second.output_dir).keys()
    reference = pack_dataset(_config(tmp_path, "c", samples_per_shard=3, num_threads=2), **encoders)
    assert shard_bytes(first.output_dir) == shard_bytes(reference.output_dir)
    for sample in read_samples([first.output_dir / s.name for s in first.shards]):
        width, height = map(int, json.loads(sample["json"])["bucket"].split("x"))
        latent = read_safetensors(sample[TENSORS_EXTENSION])[LATENT_KEY]
        assert tuple(latent.shape) == (16, height // 8, width // 8)


def test_interrupted_multires_pack_resumes_to_identical_bytes(tmp_path):
    make_dataset(tmp_path / "in", 10, sizes=SIZES)
    reference = pack_dataset(_config(tmp_path, "reference", samples_per_shard=4))
    calls = []
    with pytest.raises(PackInterrupted):
        pack_dataset(
            _config(tmp_path, samples_per_shard=4),
            should_stop=lambda: len(calls) >= 1,
            progress=lambda done, total: calls.append(done) if done >= 7 else None,
        )
    assert 1 <= len(list((tmp_path / "out").glob("*.tar"))) < len(reference.shards)
    resumed = pack_dataset(_config(tmp_path, samples_per_shard=4))
    assert resumed.reused_shards >= 1
    assert shard_bytes(resumed.output_dir) == shard_bytes(reference.output_dir)
    assert resumed.report_path.read_bytes() == reference.report_path.read_bytes()


def test_single_resolution_pack_and_old_manifests_keep_their_form(tmp_path):
    make_dataset(tmp_path / "in", 3)
    one = pack_dataset(_config(tmp_path, "one", resolution=[64]))  # a one-element list is the plain int
    manifest = _manifest(one)
    assert manifest["settings"]["resolution"] == 64
    assert manifest["resolutions"] == {"64": manifest["buckets"]}
    sample = next(read_samples([one.output_dir / one.shards[0].name]))
    assert "resolution" not in json.loads(sample["json"]) and "_r" not in sample["__key__"]
    old = {key: value for key, value in manifest.items() if key != "resolutions"}  # as packed before this change
    assert resolution_buckets(old, "old") == {64: manifest["buckets"]}
    assert resolution_buckets({"buckets": {"64x64": 1}}, "older") == {}


@pytest.mark.parametrize("value", [(), (64, 50), (64, 48), ("64",), (True,)])
def test_bad_resolution_lists_name_the_field(tmp_path, value):
    make_dataset(tmp_path / "in", 1)
    with pytest.raises(ValueError, match="PackConfig.resolution"):
        _config(tmp_path, resolution=value)


def test_cli_packs_several_resolutions(tmp_path, capsys):
    import argparse

    from training.data import cli

    make_dataset(tmp_path / "in", 4, sizes=SIZES)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(required=True))
    args = parser.parse_args(["pack", str(tmp_path / "in"), str(tmp_path / "out"), "--resolution", "64,128"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "64 px: 4 samples" in out and "128 px: 1 samples" in out
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]["resolution"] == [64, 128]
    with pytest.raises(SystemExit):
        parser.parse_args(["pack", "a", "b", "--resolution", "64,100"])
