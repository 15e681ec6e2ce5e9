"""ShardLoader: exact-once epochs across ranks and workers, bit-identical tensors, resume, raw-image shards."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch

from tests.data_fixtures import SpyLatentEncoder, SpyTextEncoder, make_dataset
from training.data.buckets import make_buckets
from training.data.images import fit_image_file
from training.data.loader import ShardLoader
from training.data.pack import PackConfig, pack_dataset
from training.data.shards import read_samples

SAMPLES = 26


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """26 samples in 3 buckets, 3 per shard (9 shards), with the encoders' own outputs keyed by sample."""
    root = tmp_path_factory.mktemp("encoded")
    make_dataset(root / "in", SAMPLES)
    latent_encoder, text_encoder = SpyLatentEncoder(), SpyTextEncoder(feature_dim=32)
    config = PackConfig(input_dir=root / "in", output_dir=root / "out", resolution=64, samples_per_shard=3)
    result = pack_dataset(config, latent_encoder=latent_encoder, text_encoder=text_encoder)
    keys = [s["__key__"] for s in read_samples([result.output_dir / s.name for s in result.shards])]
    *sample_features, _empty_caption = text_encoder.outputs  # the packer encodes "" last, for caption dropout
    expected = {
        key: (latent.to(torch.bfloat16), features.to(torch.bfloat16))
        for key, latent, features in zip(keys, latent_encoder.outputs, sample_features, strict=True)
    }
    return result.output_dir, expected


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """26 samples, one per shard: enough shards for the whole-shard layout on up to 3 readers (rank x worker)."""
    root = tmp_path_factory.mktemp("many")
    make_dataset(root / "in", SAMPLES)
    config = PackConfig(input_dir=root / "in", output_dir=root / "out", resolution=64, samples_per_shard=1)
    result = pack_dataset(config, latent_encoder=SpyLatentEncoder(), text_encoder=SpyTextEncoder(feature_dim=32))
    return result.output_dir


def _epoch(shards, world_size, **options):
    batches = []
    for rank in range(world_size):
        loader = ShardLoader(shards, rank=rank, world_size=world_size, **options)
        announced = len(loader)  # computed from the manifest before reading anything
        rank_batches = list(loader)
        assert len(rank_batches) == announced
        batches.extend(rank_batches)
    return batches


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_sample_once_per_epoch_with_exact_tensors(encoded, world_size):
    shards, expected = encoded
    assert ShardLoader(shards, batch_size=4, world_size=world_size, num_workers=2).layout == "samples"
    batches = _epoch(shards, world_size, batch_size=4, num_workers=2, shuffle_buffer=8, seed=3)
    counts = collections.Counter(key for batch in batches for key in batch.keys)
    assert set(counts) == set(expected)
    # one rank: exactly once; N ranks: each bucket's short global batch is padded by fewer than N repeats
    assert (
        sum(counts.values()) - SAMPLES == 0 if world_size == 1 else 0 <= sum(counts.values()) - SAMPLES < 3 * world_size
    )
    for batch in batches:
        width, height = batch.size
        assert batch.latents.shape == (len(batch), 16, height // 8, width // 8)
        assert batch.latents.dtype == torch.bfloat16
        assert batch.caption_mask.shape == batch.caption_features.shape[:2]
        assert batch.caption_mask.sum(dim=1).tolist() == batch.caption_lengths.tolist()
        for row, key in enumerate(batch.keys):
            latent, features = expected[key]
            length = int(batch.caption_lengths[row])
            assert torch.equal(batch.latents[row], latent)
            assert torch.equal(batch.caption_features[row, :length], features)
            assert not batch.caption_features[row, length:].any()
            assert batch.captions[row].startswith("caption number ")


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 2), (2, 0), (3, 0)])
def test_whole_shard_layout_reads_each_shard_on_one_rank(many_shards, world_size, num_workers):
    options = {"batch_size": 2, "num_workers": num_workers, "seed": 3}
    assert ShardLoader(many_shards, world_size=world_size, **options).layout == "shards"
    batches = _epoch(many_shards, world_size, **options)
    counts = collections.Counter(key for batch in batches for key in batch.keys)
    assert len(counts) == SAMPLES and set(counts.values()) == {1}


def test_layout_follows_shards_per_reader(many_shards):
    assert ShardLoader(many_shards, batch_size=2, world_size=3, num_workers=0).layout == "shards"  # 26 >= 8 x 3
    assert ShardLoader(many_shards, batch_size=2, world_size=4, num_workers=0).layout == "samples"  # 26 < 8 x 4
    assert ShardLoader(many_shards, batch_size=2, world_size=2, num_workers=2).layout == "samples"


def test_bucket_leftovers_are_short_batches_or_dropped(encoded):
    shards, _ = encoded
    kept = _epoch(shards, 1, batch_size=4, num_workers=0)
    assert sum(len(b) for b in kept) == SAMPLES and min(len(b) for b in kept) < 4
    dropped = _epoch(shards, 1, batch_size=4, num_workers=0, drop_last=True)
    assert {len(b) for b in dropped} == {4}


def test_epochs_differ_and_are_reproducible(encoded):
    shards, _ = encoded
    loader = ShardLoader(shards, batch_size=4, num_workers=0, seed=1)
    first, second = [b.keys for b in loader], [b.keys for b in loader]
    assert loader.epoch == 2 and first != second
    again = ShardLoader(shards, batch_size=4, num_workers=0, seed=1)
    assert [b.keys for b in again] == first


def test_even_batches_gives_every_rank_the_same_step_count(many_shards):
    loaders = [
        ShardLoader(many_shards, batch_size=2, rank=r, world_size=3, num_workers=0, even_batches=True) for r in range(3)
    ]
    assert {loader.layout for loader in loaders} == {"shards"}
    steps = {loader.steps_per_epoch for loader in loaders}
    assert len(steps) == 1
    assert [len(list(loader)) for loader in loaders] == [steps.pop()] * 3


@pytest.mark.parametrize(
    ("fixture", "num_workers", "world_size", "stop_after"),
    [
        ("encoded", 2, 1, 3),
        ("encoded", 0, 1, 2),
        ("encoded", 2, 2, 1),
        ("many", 1, 2, 4),
        ("many", 2, 1, 3),  # two workers, stopped after an odd batch: the DataLoader's turns restart at worker 0
        ("many", 0, 1, -1),
        ("encoded", 2, 2, -1),
    ],
)
def test_resume_neither_repeats_nor_skips(encoded, many_shards, fixture, num_workers, world_size, stop_after):
    shards = encoded[0] if fixture == "encoded" else many_shards
    for rank in range(world_size):
        options = {"batch_size": 3, "rank": rank, "world_size": world_size, "num_workers": num_workers, "seed": 5}
        loader = ShardLoader(shards, **options)
        stop = len(loader) if stop_after == -1 else stop_after  # -1: after the epoch's last batch
        uninterrupted = [key for batch in ShardLoader(shards, **options) for key in batch.keys]
        before_stop = []
        for taken, batch in enumerate(loader, start=1):
            before_stop.extend(batch.keys)
            if taken == stop:
                break
        state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
        assert state["samples_consumed"] == len(before_stop) and state["epoch"] == 0
        restored = ShardLoader(shards, **options)
        restored.load_state_dict(state)
        after_resume = [key for batch in restored for key in batch.keys]
        assert before_stop + after_resume == uninterrupted
        assert restored.state_dict()["epoch"] == 1 and restored.state_dict()["samples_consumed"] == 0


def test_state_from_other_settings_is_refused(encoded, many_shards):
    state = ShardLoader(many_shards, batch_size=3, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="num_workers=2"):
        ShardLoader(many_shards, batch_size=3, num_workers=1).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=3"):
        ShardLoader(many_shards, batch_size=2, num_workers=2).load_state_dict(state)
    with pytest.raises(ValueError, match="'shards' layout but this loader uses 'samples'"):
        ShardLoader(encoded[0], batch_size=3, num_workers=2).load_state_dict(
            {**state, "shard_order": ShardLoader(encoded[0], batch_size=3).shard_order()}
        )


def test_sample_layout_resumes_with_other_workers(encoded):
    """Its order does not depend on the workers, so neither does its state."""
    shards, _ = encoded
    loader = ShardLoader(shards, batch_size=3, world_size=2, num_workers=2, seed=1)
    first = next(iter(loader)).keys
    restored = ShardLoader(shards, batch_size=3, world_size=2, num_workers=0, seed=1)
    restored.load_state_dict(loader.state_dict())
    rest = [key for batch in restored for key in batch.keys]
    assert first + rest == [
        key for batch in ShardLoader(shards, batch_size=3, world_size=2, seed=1) for key in batch.keys
    ]


def test_argument_errors(encoded):
    shards, _ = encoded
    with pytest.raises(ValueError, match="rank=2"):
        ShardLoader(shards, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no manifest.json"):
        ShardLoader(shards / "missing", batch_size=2)


@pytest.mark.parametrize("image_format", ["png", "jpg", "webp"])
def test_raw_image_shards_decode_on_cpu(tmp_path, image_format):
    paths = make_dataset(tmp_path / "in", 5)
    config = PackConfig(
        input_dir=tmp_path / "in",
        output_dir=tmp_path / "out",
        resolution=64,
        samples_per_shard=2,
        store_image=True,
        image_format=image_format,
    )
    pack_dataset(config)
    loader = ShardLoader(tmp_path / "out", batch_size=2, num_workers=0, image_decode="auto")
    batches = list(loader)
    assert sum(len(b) for b in batches) == 5
    fitted = {
        p.name: np.asarray(fit_image_file(p, make_buckets(64), upscale=False, background=(255,) * 3).image)
        for p in paths
    }
    for batch in batches:
        width, height = batch.size
        assert batch.latents is None and batch.caption_features is None
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (len(batch), 3, height, width)
        for row, caption in enumerate(batch.captions):
            source = f"img{int(caption.rsplit(' ', 1)[1]):03d}.png"
            difference = np.abs(batch.images[row].permute(1, 2, 0).numpy().astype(int) - fitted[source])
            assert difference.max() == 0 if image_format == "png" else difference.mean() < 40
    with pytest.raises(ValueError, match="image_decode='cuda'"):
        ShardLoader(tmp_path / "out", batch_size=2, image_decode="cuda")


def test_batch_pin_memory_and_to_keep_fields(encoded):
    shards, _ = encoded
    batch = next(iter(ShardLoader(shards, batch_size=2, num_workers=0)))
    moved = batch.to("cpu")
    assert moved.keys == batch.keys and torch.equal(moved.latents, batch.latents)
