"""Whole runs on packed shards (tiny model, CPU, float32): resume at any loader position, epoch boundaries included,
continues exactly; 2 gloo processes give the loss curve of one; a set smaller than one global batch is refused
before training.

Tolerances as in test_engine_runs.py: resume on the same process count is exact; 2 processes vs 1, relative 1e-5.
"""

from __future__ import annotations

import copy

import pytest

from tests.test_engine_runs import assert_same_curve, tiny_config, train_in_process, train_subprocess
from training.apps.demo import make_images, pack_images
from training.engine.config import TrainConfig
from training.engine.trainer import run_training
from training.run.events import read_events, read_status


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Shard sets of 3, 4 and 8 square images (one bucket) for the tiny model, one shard each."""
    root = tmp_path_factory.mktemp("packed")
    sets = {}
    for count in (3, 4, 8):
        images = make_images(root / f"images-{count}", count=count, size=96)
        sets[count] = pack_images(images, root / f"shards-{count}", resolution=64, seed=0)
    return sets


def shard_config(run_dir, shards, *, steps: int, num_workers: int = 0, **run) -> dict:
    config = tiny_config(run_dir, micro_batch=run.pop("micro_batch", 1), grad_accum=run.pop("grad_accum", 1), **run)
    config["run"]["steps"] = steps
    config["data"] = {"shards": str(shards), "num_workers": num_workers, "caption_dropout": 0.3}
    config["optim"] = {"lr": 1e-3}  # constant: a run's length does not change its curve, so runs can be extended
    return config


def with_steps(config: dict, steps: int) -> dict:
    extended = copy.deepcopy(config)
    extended["run"]["steps"] = steps
    return extended


def test_extending_a_finished_run_continues_exactly(tmp_path, packed):
    """The report of #23: 4 images, steps 4 with save_every 4 (the checkpoint ends epoch 0), then steps 6."""
    reference = train_in_process(shard_config(tmp_path / "reference", packed[4], steps=6))
    first = shard_config(tmp_path / "run", packed[4], steps=4, save_every=4)
    assert len(train_in_process(first)) == 4
    resumed = train_in_process(with_steps(first, 6))
    assert read_status(tmp_path / "run")["state"] == "completed"
    assert_same_curve(resumed, reference, rel=0)


def test_resume_at_every_step_continues_exactly(tmp_path, packed):
    """3 samples, one per step: stopping after each step of 7 (epoch boundaries after 3 and 6) and resuming."""
    steps = 7
    reference = train_in_process(shard_config(tmp_path / "reference", packed[3], steps=steps))
    config = shard_config(tmp_path / "run", packed[3], steps=1)
    for stop in range(1, steps + 1):
        train_in_process(with_steps(config, stop))
        assert_same_curve(read_events(tmp_path / "run"), reference[:stop], rel=0)
    attempts = [e["step"] for e in read_events(tmp_path / "run", resumed_history=False)]
    assert attempts == list(range(1, steps + 1))  # each attempt resumed: no step trained twice


def test_resume_at_an_epoch_boundary_with_workers(tmp_path, packed):
    """8 samples, 2 per step: epoch 0 ends at step 4; the loader runs in 2 worker processes."""
    reference = train_in_process(shard_config(tmp_path / "reference", packed[8], steps=6, micro_batch=2))
    config = shard_config(tmp_path / "run", packed[8], steps=4, micro_batch=2, num_workers=2)
    train_in_process(config)
    assert_same_curve(train_in_process(with_steps(config, 6)), reference, rel=0)


def test_two_processes_on_shards_match_one_and_resume_at_an_epoch_boundary(tmp_path, packed):
    """One process with micro-batch 2 vs two with micro-batch 1 (grad_accum 2: 4 samples a step, 2 steps an epoch)
    on one shard of 8: the ranks split its samples. The 2-process run stops at the end of epoch 0, then resumes."""
    single = train_in_process(shard_config(tmp_path / "one", packed[8], steps=4, micro_batch=2, grad_accum=2))
    double = shard_config(tmp_path / "two", packed[8], steps=2, micro_batch=1, grad_accum=2, num_workers=2)
    assert len(train_subprocess(double, nproc=2)) == 2
    resumed = train_subprocess(with_steps(double, 4), nproc=2)
    assert read_status(tmp_path / "two")["state"] == "completed"
    assert_same_curve(resumed, single, rel=1e-5)


def test_a_set_smaller_than_one_global_batch_is_refused_before_training(tmp_path, packed):
    config = shard_config(tmp_path / "run", packed[3], steps=2, micro_batch=2, grad_accum=2)
    with pytest.raises(ValueError, match=r"holds 3 samples, fewer than one global batch of 4 \(run.micro_batch 2"):
        run_training(TrainConfig.from_dict(config))
    assert read_events(tmp_path / "run") == []
