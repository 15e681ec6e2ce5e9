"""ShardLoader on any set and any rank count: ranks split samples when whole shards cannot give each an equal share.

The matrix: 1-4 ranks x 0 and 2 workers over sets of 1-40 samples in 1-5 shards (three buckets). The sets are cut
from one packed set by rewriting its samples into new shards (no encoding per set), and the ranks of a run are
ShardLoaders constructed with rank/world_size in this process (the split needs no process group).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from tests.data_fixtures import make_dataset
from training.data.encoders import TestLatentEncoder, TestTextEncoder
from training.data.loader import ShardLoader
from training.data.pack import PackConfig, pack_dataset
from training.data.shards import MANIFEST_NAME, ShardSample, ShardWriter, load_manifest, read_samples

MICRO_BATCH = 2
SETS = [(1, 1), (2, 2), (3, 1), (4, 3), (5, 5), (7, 2), (8, 1), (11, 4), (13, 5), (20, 3), (29, 2), (40, 5)]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[dict, list[dict]]:
    """40 encoded samples in three buckets: (manifest, samples as WebDataset dicts in pack order)."""
    root = tmp_path_factory.mktemp("source")
    make_dataset(root / "in", 40)
    config = PackConfig(input_dir=root / "in", output_dir=root / "out", resolution=64, samples_per_shard=40)
    result = pack_dataset(config, latent_encoder=TestLatentEncoder(), text_encoder=TestTextEncoder(feature_dim=8))
    _, manifest = load_manifest(result.output_dir)
    return manifest, list(read_samples([result.output_dir / s.name for s in result.shards]))


def reshard(source: tuple[dict, list[dict]], folder: Path, samples: int, shards: int) -> Path:
    """The first `samples` samples of the source set rewritten into `shards` shards (sizes differing by <= 1)."""
    manifest, records = source
    folder.mkdir(parents=True)
    infos = []
    for index in range(shards):
        writer = ShardWriter(path=folder / f"set-{index:06d}.tar")
        for record in records[:samples][index::shards]:
            members = tuple((name, data) for name, data in record.items() if not name.startswith("__"))
            bucket = json.loads(record["json"])["bucket"]
            writer.add(ShardSample(key=record["__key__"], members=members, bucket=bucket))
        infos.append(writer.finish(end_input=0).to_json())
    resharded = {**manifest, "samples": samples, "shards": infos}
    (folder / MANIFEST_NAME).write_text(json.dumps(resharded))
    return folder


def epoch_of(shards: Path, world_size: int, **options) -> list[list]:
    """One epoch of every rank: [rank][position] -> batch."""
    ranks = []
    for rank in range(world_size):
        loader = ShardLoader(shards, rank=rank, world_size=world_size, seed=7, **options)
        announced = len(loader)
        ranks.append(list(loader))
        assert len(ranks[-1]) == announced
    return ranks


def keys(ranks: list[list]) -> list[list[list[str]]]:
    return [[batch.keys for batch in batches] for batches in ranks]


@pytest.fixture(scope="module")
def sets(source, tmp_path_factory) -> dict[tuple[int, int], Path]:
    root = tmp_path_factory.mktemp("sets")
    return {(n, s): reshard(source, root / f"{n}-{s}", n, s) for n, s in SETS}


@pytest.mark.parametrize(("samples", "shards"), SETS)
def test_every_rank_gets_equal_batches_and_every_sample(sets, source, samples, shards):
    records = {r["__key__"]: json.loads(r["json"])["bucket"] for r in source[1][:samples]}
    for world_size in (1, 2, 3, 4):
        ranks = epoch_of(sets[samples, shards], world_size, batch_size=MICRO_BATCH, num_workers=0)
        assert len({len(batches) for batches in ranks}) == 1, "every rank does the same number of steps"
        steps = len(ranks[0])
        counts = collections.Counter(key for batches in ranks for batch in batches for key in batch.keys)
        assert set(counts) == set(records)
        padding = 0
        for position in range(steps):
            group = [batch.keys for batches in ranks for batch in (batches[position],)]
            assert len({len(share) for share in group}) == 1, "equal shares: DDP's mean of means is the mean"
            assert 1 <= len(group[0]) <= MICRO_BATCH
            assert len({records[key] for share in group for key in share}) == 1, "one bucket per global batch"
            flat = [key for share in group for key in share]
            padding += len(flat) - len(set(flat))
            assert len(flat) - len(set(flat)) < world_size
        assert sum(counts.values()) == samples + padding  # the only repeats are the padding of short batches
        if world_size == 1:
            assert padding == 0


@pytest.mark.parametrize(("samples", "shards"), [(13, 5), (29, 2), (40, 5)])
def test_one_rank_sees_the_global_batches_of_n_ranks(sets, samples, shards):
    """One process with micro-batch W·b sees, position by position, what W processes with micro-batch b see."""
    for world_size in (2, 3, 4):
        (single,) = keys(epoch_of(sets[samples, shards], 1, batch_size=MICRO_BATCH * world_size, num_workers=0))
        ranks = keys(epoch_of(sets[samples, shards], world_size, batch_size=MICRO_BATCH, num_workers=0))
        assert len(ranks[0]) == len(single)
        for position, expected in enumerate(single):
            together = [key for share in ranks for key in share[position]]
            if len(expected) == MICRO_BATCH * world_size:
                assert together == expected  # the same samples in the same positions (the objective's indices)
            else:
                assert set(together) == set(expected)  # a short batch, padded on N ranks


@pytest.mark.parametrize(("samples", "shards"), [(5, 5), (20, 3), (40, 5)])
def test_workers_do_not_change_the_order(sets, samples, shards):
    for world_size in (1, 2, 3, 4):
        options = {"batch_size": MICRO_BATCH}
        without = keys(epoch_of(sets[samples, shards], world_size, num_workers=0, **options))
        assert keys(epoch_of(sets[samples, shards], world_size, num_workers=2, **options)) == without


def _resumed_run(shards: Path, rank: int, world_size: int, stop_after: int, epochs: int, **options) -> list:
    """Keys of `epochs` epochs of one rank, stopped after `stop_after` batches, saved, restored, continued."""
    loader = ShardLoader(shards, rank=rank, world_size=world_size, seed=7, **options)
    stream = _endless(loader)
    seen = [next(stream).keys for _ in range(stop_after)]
    state = json.loads(json.dumps(loader.state_dict()))  # a JSON checkpoint
    restored = ShardLoader(shards, rank=rank, world_size=world_size, seed=7, **options)
    restored.load_state_dict(state)
    stream = _endless(restored)
    total = epochs * len(loader)
    return seen + [next(stream).keys for _ in range(total - stop_after)]


def _endless(loader: ShardLoader):
    while True:  # as the trainer's `_epochs`: a pass may be empty when it starts at a finished epoch's end
        yield from loader


@pytest.mark.parametrize(("samples", "shards", "world_size"), [(7, 2, 1), (11, 4, 3), (40, 5, 2)])
def test_resume_anywhere_is_exact(sets, samples, shards, world_size):
    """Stopping after any batch of two epochs, epoch boundaries included, then resuming gives the same stream."""
    options = {"batch_size": MICRO_BATCH, "num_workers": 0}
    per_epoch = len(ShardLoader(sets[samples, shards], world_size=world_size, seed=7, **options))
    for rank in range(world_size):
        expected = _resumed_run(sets[samples, shards], rank, world_size, 0, 3, **options)
        for stop in range(1, per_epoch * 2 + 1):
            assert _resumed_run(sets[samples, shards], rank, world_size, stop, 3, **options) == expected, stop


def test_resume_at_an_epoch_boundary_with_workers(sets):
    shards, world_size, options = sets[11, 4], 3, {"batch_size": MICRO_BATCH, "num_workers": 2}
    per_epoch = len(ShardLoader(shards, world_size=world_size, seed=7, **options))
    expected = _resumed_run(shards, 1, world_size, 0, 2, **options)
    for stop in (per_epoch - 1, per_epoch, per_epoch + 1):
        assert _resumed_run(shards, 1, world_size, stop, 2, **options) == expected, stop
