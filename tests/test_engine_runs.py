"""Whole runs of the engine on the tiny model (CPU, float32, synthetic data):

* 2-process torchrun (gloo) DDP and FSDP2 give the loss curve of one process with the same global batch;
* a run killed after a checkpoint (SIGKILL), then stopped gracefully (SIGTERM), then resumed, gives exactly the
  uninterrupted run's curve;
* QLoRA trains, with NF4 base weights.

Tolerances: DDP/FSDP2 vs one process, relative 1e-5 on every step's loss (measured: ~1e-7; only the order of
float32 reductions differs). Resume on the same process count: exact equality (every random draw is a function of
(seed, step, sample index), and the optimizer state is restored bit for bit).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.engine.config import TrainConfig
from training.engine.trainer import run_training
from training.model.weights import load_transformer
from training.run.events import read_events, read_status

REPO = Path(__file__).resolve().parents[1]
STEPS = 4


def tiny_config(run_dir: Path, mode: str = "lora", *, micro_batch: int = 4, grad_accum: int = 2, **run) -> dict:
    return {
        "mode": mode,
        "run": {
            "output_dir": str(run_dir),
            "steps": STEPS,
            "micro_batch": micro_batch,
            "grad_accum": grad_accum,
            "checkpoint_depth": 1,
            **run,
        },
        "model": {"preset": "tiny", "dtype": "fp32"},
        "lora": {"rank": 4},
        "data": {"synthetic": True, "resolution": 64, "caption_tokens": 16, "caption_dropout": 0.3},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
    }


def write_config(config: dict) -> Path:
    path = Path(config["run"]["output_dir"]) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def train_in_process(config: dict) -> list[dict]:
    assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    return read_events(config["run"]["output_dir"])


def command(config_path: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "training", "train", "--config", str(config_path)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*torchrun, "-m", "training", "train", "--config", str(config_path)]


def train_subprocess(config: dict, nproc: int) -> list[dict]:
    path = write_config(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command(path, nproc), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return read_events(config["run"]["output_dir"])


def assert_same_curve(actual: list[dict], expected: list[dict], rel: float) -> None:
    assert [e["step"] for e in actual] == [e["step"] for e in expected]
    for got, want in zip(actual, expected):
        assert got["loss"] == pytest.approx(want["loss"], rel=rel), f"step {got['step']}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=rel), f"step {got['step']}"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_processes_match_one(tmp_path, mode):
    """One process with micro-batch 4 vs two with micro-batch 2: the same 8 samples per step (grad_accum 2)."""
    single = train_in_process(tiny_config(tmp_path / "one", mode, micro_batch=4))
    double = train_subprocess(tiny_config(tmp_path / "two", mode, micro_batch=2), nproc=2)
    assert len(single) == STEPS
    assert_same_curve(double, single, rel=1e-5)
    assert read_status(tmp_path / "two")["state"] == "completed"
    if mode == "lora":
        assert (tmp_path / "two" / "lora.safetensors").is_file()
    else:  # the fine-tuned model, gathered from the FSDP2 shards, equals the one-process model (bf16 file)
        one, two = (load_transformer(tmp_path / run / "model.safetensors").state_dict() for run in ("one", "two"))
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name].float(), one[name].float(), rtol=8e-3, atol=1e-6, msg=name)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS


def test_bf16_gradient_all_reduce_stays_close_to_float32(tmp_path):
    """run.ddp_bf16_grads rounds each rank's LoRA gradient to bf16 before averaging: close, not equal."""
    single = train_in_process(tiny_config(tmp_path / "one", micro_batch=4))
    double = train_subprocess(tiny_config(tmp_path / "two", micro_batch=2, ddp_bf16_grads=True), nproc=2)
    assert_same_curve(double, single, rel=2e-2)
    assert any(got["grad_norm"] != want["grad_norm"] for got, want in zip(double, single))


def _wait_for(condition, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended early with code {process.returncode}"
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s"
        time.sleep(0.02)


def test_kill_stop_resume_gives_the_uninterrupted_curve(tmp_path):
    """SIGKILL after a checkpoint, resume; SIGTERM (graceful: finish the step, save, exit 0), resume to the end."""
    steps = 12
    reference = train_in_process({**tiny_config(tmp_path / "reference", steps=steps), "optim": {"lr": 1e-3}})
    # The interrupted run is configured much longer (constant LR, so the length does not change the curve) so it
    # cannot finish before the signals arrive; the last attempt is given the reference's length.
    long = {**tiny_config(tmp_path / "run", steps=10_000, save_every=2), "optim": {"lr": 1e-3}}
    path = write_config(long)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    process = subprocess.Popen(command(path, 1), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: (tmp_path / "run/checkpoints/step-000002/checkpoint.json").is_file(), process)
    process.kill()
    process.wait(timeout=30)

    process = subprocess.Popen(command(path, 1), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: (read_events(tmp_path / "run") or [{"step": 0}])[-1]["step"] >= 7, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    status = read_status(tmp_path / "run")
    assert status["state"] == "stopped", status
    stopped_at = read_events(tmp_path / "run")[-1]["step"]
    assert stopped_at < steps, "the run finished before SIGTERM arrived; the test needs slower steps"
    assert (tmp_path / f"run/checkpoints/step-{stopped_at:06d}/checkpoint.json").is_file()

    resumed = train_subprocess({**long, "run": {**long["run"], "steps": steps}}, nproc=1)
    assert read_status(tmp_path / "run")["state"] == "completed"
    assert_same_curve(resumed, reference, rel=0)
    assert b"resuming at step" in stderr
    attempts = [e["step"] for e in read_events(tmp_path / "run", resumed_history=False)]
    assert attempts.count(1) == 1, attempts  # no attempt started over from scratch


def test_qlora_loss_decreases(tmp_path):
    """(That its base is NF4 is checked in test_engine_quantize.py on the model the trainer builds.)"""
    pytest.importorskip("bitsandbytes")
    config = tiny_config(tmp_path / "qlora", "qlora", micro_batch=8, grad_accum=1, steps=30, checkpoint_depth=0)
    config["lora"] = {"rank": 8, "targets": "all"}
    config["optim"] = {"lr": 1e-2}
    config["data"]["caption_dropout"] = 0.0
    losses = [e["loss"] for e in train_in_process(config)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, losses


def test_compiled_qlora_trains_the_curve_of_eager_qlora(tmp_path):
    """Compiled, QLoRA's NF4 base is dequantised inside the graphs (training/engine/nf4_frozen.py, issue 12): the same
    numbers as bitsandbytes' Linear4bit, so the loss curve is eager's."""
    pytest.importorskip("bitsandbytes")
    curves = {}
    for compiled in (False, True):
        config = tiny_config(
            tmp_path / f"q{compiled}", "qlora", micro_batch=4, grad_accum=1, steps=6, checkpoint_depth=0
        )
        config["run"]["compile"] = compiled
        config["optim"] = {"lr": 1e-2}
        curves[compiled] = [e["loss"] for e in train_in_process(config)]
    assert len(curves[True]) == 6
    for eager, compiled in zip(curves[False], curves[True]):
        assert compiled == pytest.approx(eager, rel=1e-4)


ONE_RANK_STOPS = """
import runpy, sys
from training.engine.trainer import Trainer

original = Trainer.train_step


def train_step(self, *, stop_requested=False):  # rank 1 alone asks to stop during its second step
    return original(self, stop_requested=stop_requested or (self.dist_info.rank == 1 and self.step == 1))


Trainer.train_step = train_step
sys.argv = ["training", "train", "--config", sys.argv[1]]
runpy.run_module("training", run_name="__main__")
"""


def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The stop request travels in the step's one metrics all-reduce: every rank saves and stops after step 2."""
    config = tiny_config(tmp_path / "run", micro_batch=2)
    path = write_config(config)
    script = tmp_path / "one_rank_stops.py"
    script.write_text(ONE_RANK_STOPS)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*torchrun, str(script), str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert read_status(tmp_path / "run")["state"] == "stopped"
    assert [e["step"] for e in read_events(tmp_path / "run")] == [1, 2]
    assert all("stop_requested" not in e for e in read_events(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()
