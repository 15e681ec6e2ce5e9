"""Resolution schedules end to end (tiny model, CPU, float32, gloo): a progressive or mixed run over a shard set
packed at two resolutions trains each step at one resolution with that resolution's micro-batch, logs the loss per
resolution, and resumes in the middle of the schedule exactly, on one process and on two (which match one)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from tests.test_engine_runs import REPO, assert_same_curve, tiny_config, train_in_process, write_config
from training.apps.demo import make_images, pack_images
from training.engine.config import TrainConfig
from training.engine.trainer import Trainer, run_training
from training.run.events import read_events, read_status

STOP_AT = """
import os, runpy, sys
from training.engine.trainer import Trainer

original = Trainer.train_step
stop_after = int(os.environ["STOP_AFTER_STEP"])


def train_step(self, *, stop_requested=False):  # rank 0 asks to stop during step `stop_after`
    return original(self, stop_requested=stop_requested or (self.dist_info.rank == 0 and self.step + 1 == stop_after))


Trainer.train_step = train_step
sys.argv = ["training", "train", "--config", sys.argv[1]]
runpy.run_module("training", run_name="__main__")
"""


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """8 square images packed at 64 and 128 px (16 samples, one bucket per resolution)."""
    root = tmp_path_factory.mktemp("multires")
    images = make_images(root / "images", count=8, size=160)
    return pack_images(images, root / "shards", resolution=(64, 128), seed=0)


def scheduled(run_dir, shards, *, world: int = 1, steps: int = 6, schedule: str = "progressive") -> dict:
    """Global batch 4: 64 px in micro-batches of 4/world, 128 px in 2/world with 2 accumulation steps."""
    config = tiny_config(run_dir, micro_batch=2 // world, grad_accum=2)
    config["run"]["steps"] = steps
    config["run"]["save_every"] = 1
    config["data"] = {"shards": str(shards), "num_workers": 0, "caption_dropout": 0.3}
    config["optim"] = {"lr": 1e-3}
    config["resolutions"] = {
        "schedule": schedule,
        "micro_batch": {"64": 4 // world, "128": 2 // world},
        "grad_accum": {"64": 1, "128": 2},
        "shift_rule": "sqrt_area",
        "shift_reference": 128,
    }
    if schedule == "progressive":
        config["resolutions"]["stages"] = [[64, 0.5], [128, 1.0]]
    else:
        config["resolutions"]["weights"] = {"64": 0.5, "128": 0.5}
    return config


def stopped_then_resumed_in_process(config: dict, stop_after: int, monkeypatch) -> list[dict]:
    original = Trainer.train_step

    def stopping(self, *, stop_requested=False):
        return original(self, stop_requested=stop_requested or self.step + 1 == stop_after)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", stopping)
        assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    assert read_status(config["run"]["output_dir"])["state"] == "stopped"
    assert [e["step"] for e in read_events(config["run"]["output_dir"])] == list(range(1, stop_after + 1))
    return train_in_process(config)


def test_progressive_schedule_trains_each_resolution_with_its_micro_batch(tmp_path, two_sizes):
    events = train_in_process(scheduled(tmp_path / "run", two_sizes))
    assert [e["resolution"] for e in events] == [64, 64, 64, 128, 128, 128]  # round(0.5 x 6) = 3 steps at 64 px
    assert [e["shape"] for e in events] == ["64x64"] * 3 + ["128x128"] * 3
    assert [e["micro_batch"] for e in events] == [4] * 3 + [2] * 3
    assert all(e["loss_by_resolution"] == {str(e["resolution"]): e["loss"]} for e in events)
    assert all(e["img_per_s"] * e["step_s"] == pytest.approx(4) for e in events)  # the effective batch is kept
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["by_resolution"]["64"]["steps"] == 3 and summary["by_shape"]["128x128"]["steps"] == 3


@pytest.mark.parametrize(("schedule", "stop_after"), [("progressive", 2), ("progressive", 4), ("mix", 3)])
def test_resume_in_the_middle_of_a_schedule_is_exact(tmp_path, two_sizes, monkeypatch, schedule, stop_after):
    reference = train_in_process(scheduled(tmp_path / "reference", two_sizes, schedule=schedule))
    if schedule == "mix":
        assert {e["resolution"] for e in reference} == {64, 128}
    resumed = stopped_then_resumed_in_process(scheduled(tmp_path / "run", two_sizes, schedule=schedule), stop_after,
                                              monkeypatch)  # fmt: skip
    assert read_status(tmp_path / "run")["state"] == "completed"
    assert [e["resolution"] for e in resumed] == [e["resolution"] for e in reference]
    assert_same_curve(resumed, reference, rel=0)


def test_two_processes_match_one_and_resume_in_the_middle_of_a_schedule(tmp_path, two_sizes):
    single = train_in_process(scheduled(tmp_path / "one", two_sizes))
    config = scheduled(tmp_path / "two", two_sizes, world=2)
    path = write_config(config)
    script = tmp_path / "stop_at.py"
    script.write_text(STOP_AT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "STOP_AFTER_STEP": "4"}
    stop_then_resume = (
        [*torchrun, str(script), str(path)],
        [*torchrun, "-m", "training", "train", "--config", str(path)],
    )
    for attempt, argv in enumerate(stop_then_resume):
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert read_status(tmp_path / "two")["state"] == ("stopped", "completed")[attempt]
    attempts = [e["step"] for e in read_events(tmp_path / "two", resumed_history=False)]
    assert attempts == [1, 2, 3, 4, 5, 6]  # stopped after 4, resumed at 5
    assert_same_curve(read_events(tmp_path / "two"), single, rel=1e-5)


def test_schedule_needs_the_resolutions_it_trains(tmp_path, two_sizes):
    config = scheduled(tmp_path / "run", two_sizes)
    config["resolutions"]["stages"] = [[64, 0.5], [96, 1.0]]
    config["resolutions"]["micro_batch"] = {"64": 4, "96": 2}
    config["resolutions"]["grad_accum"] = {"64": 1, "96": 2}
    with pytest.raises(ValueError, match=r"trains 96 px but .* was packed at 64, 128 px: repack with --resolution"):
        run_training(TrainConfig.from_dict(config))
    assert read_events(tmp_path / "run") == []
