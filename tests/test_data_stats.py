"""Dataset statistics in the manifest: bucket counts and the encoded caption-length distribution, read back safely."""

from __future__ import annotations

import json

import pytest

from tests.data_fixtures import make_dataset, write_caption
from training.data.encoders import TestLatentEncoder, TestTextEncoder
from training.data.pack import PackConfig, pack_dataset
from training.data.stats import DatasetStats, percentile, read_dataset_stats

ENCODERS = {"latent_encoder": TestLatentEncoder(), "text_encoder": TestTextEncoder()}


def packed_with_captions(tmp_path, lengths: list[int], should_stop=None, **overrides):
    """A shard set whose captions have the given lengths in characters (the test encoder: 1 + chars tokens)."""
    images = make_dataset(tmp_path / "in", len(lengths))
    for image, length in zip(sorted(images), lengths):
        write_caption(image, "x" * length)
    settings = {"input_dir": tmp_path / "in", "output_dir": tmp_path / "out", "resolution": 64} | overrides
    return pack_dataset(PackConfig(**settings), **ENCODERS, should_stop=should_stop)


def test_percentile_is_nearest_rank():
    histogram = {10: 98, 200: 1, 600: 1}
    assert percentile(histogram, 50) == 10 and percentile(histogram, 98) == 10
    assert percentile(histogram, 99) == 200 and percentile(histogram, 100) == 600
    with pytest.raises(ValueError, match="percentile"):
        percentile(histogram, 0)


def test_manifest_records_caption_tokens_and_buckets(tmp_path):
    lengths = [9, 19, 29, 99, 299, 39, 49]
    result = packed_with_captions(tmp_path, lengths, samples_per_shard=3)
    manifest = json.loads(result.manifest_path.read_text())
    section = manifest["caption_tokens"]
    tokens = sorted(n + 1 for n in lengths)  # the BOS token
    assert section["samples"] == 7 and section["max"] == 300 and section["p50"] == 40
    assert section["p99"] == 300 and section["mean"] == pytest.approx(sum(tokens) / 7, abs=0.01)
    assert sum(section["histogram"].values()) == 7
    assert sum(sum(s["caption_tokens"].values()) for s in manifest["shards"]) == 7  # per shard, for resume
    stats = read_dataset_stats(result.output_dir)
    assert stats.samples == 7 and stats.caption_tokens_max == 300 and stats.captions_longer_than(100) == 1
    assert stats.buckets == {(48, 80): 2, (64, 64): 2, (80, 48): 3}
    assert "up to 300 tokens" in stats.describe()


def test_stats_survive_an_interrupted_pack(tmp_path):
    from training.data.pack import PackInterrupted

    lengths = [5, 50, 400, 7, 70, 300]
    config = {"samples_per_shard": 2, "num_threads": 1}
    calls = {"n": 0}

    def stop_after_first_shard():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(PackInterrupted):
        packed_with_captions(tmp_path, lengths, **config, should_stop=stop_after_first_shard)
    resumed = pack_dataset(PackConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "out", resolution=64,
                                      **config), **ENCODERS)  # fmt: skip
    stats = read_dataset_stats(resumed.output_dir)
    assert sorted(stats.caption_histogram) == sorted(n + 1 for n in lengths)


def test_raw_and_old_manifests_have_no_caption_statistics(tmp_path):
    make_dataset(tmp_path / "in", 3)
    raw = pack_dataset(
        PackConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "raw", resolution=64, store_image=True)
    )
    assert "caption_tokens" not in json.loads(raw.manifest_path.read_text())
    assert read_dataset_stats(raw.output_dir).caption_histogram is None
    assert "caption lengths unknown" in read_dataset_stats(raw.output_dir).describe()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"buckets": {"64x64": 3, "../x": 1}}, "bucket"),
        ({"buckets": {"64x64": -1}}, "bucket"),
        ({"samples": 5}, "samples"),
        ({"caption_tokens": {"histogram": {"12": 2}}}, "counts 2 of 3"),
        ({"caption_tokens": {"histogram": {"-4": 3}}}, "caption length"),
        ({"caption_tokens": {"histogram": {"12": True, "13": 2}}}, "caption length"),
        ({"caption_tokens": []}, "histogram"),
    ],
)
def test_untrusted_manifest_values_are_refused(change, message):
    manifest = {"samples": 3, "buckets": {"64x64": 3}, "caption_tokens": {"histogram": {"12": 3}}} | change
    with pytest.raises(ValueError, match=message):
        DatasetStats.from_manifest(manifest, "set")
