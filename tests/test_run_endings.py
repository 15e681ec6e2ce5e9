"""Every ending of a run leaves a final status that names what happened (issue 13, defect 6):

* a failure that is not an ``Exception`` (torch's ``CheckpointException`` on a truncated checkpoint) is 'failed';
* a second failure in the same run folder shows its own traceback, not the first attempt's;
* a full disk during training ends 'failed' with a message saying so, not 'running'.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import training.atomic
from training.__main__ import main
from training.engine.config import TrainConfig
from training.engine.trainer import run_training
from training.run import events, failure, launch
from training.run.events import read_status, write_status

REPO = Path(__file__).resolve().parents[1]


def tiny_config(run_dir: Path, *, steps: int = 2, **run) -> dict:
    return {
        "run": {"output_dir": str(run_dir), "steps": steps, "micro_batch": 1, "checkpoint_depth": 0, **run},
        "model": {"preset": "tiny", "dtype": "fp32"},
        "lora": {"rank": 2},
        "data": {"synthetic": True, "resolution": 32, "caption_tokens": 8, "caption_dropout": 0.0},
    }


def write_config(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------------------- not an Exception


def test_checkpoint_exception_is_recorded_as_failed(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    cause = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    assert not issubclass(CheckpointException, Exception)
    failure.bind_run(tmp_path, rank=0, world_size=1)

    @failure.record
    def entry():
        raise CheckpointException("load failed", {0: (cause, traceback.StackSummary())})

    try:
        with pytest.raises(CheckpointException):
            entry()
    finally:
        failure.unbind_run()
    status = read_status(tmp_path)
    assert status["state"] == "failed"
    assert "checkpoint could not be read" in status["message"] and "PytorchStreamReader failed" in status["message"]
    assert (tmp_path / "error.txt").read_text().startswith("rank 0: CheckpointException")


@pytest.mark.slow
def test_truncated_checkpoint_ends_with_a_final_status(tmp_path):
    """A run resumed from a checkpoint whose tensor file was cut in half: its status names the outcome, never
    'starting' (with DCP the load raises CheckpointException, which is not an Exception)."""
    run_dir = tmp_path / "run"
    first = write_config(tiny_config(run_dir, steps=2, save_every=0), tmp_path / "first.json")
    assert main(["train", "--config", str(first)]) == 0
    tensors = max((p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # the weights file, cut in half
    second = write_config(tiny_config(run_dir, steps=4, save_every=0), tmp_path / "second.json")
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--config", str(second)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    status = read_status(run_dir)
    assert status["state"] in ("failed", "completed"), status
    if status["state"] == "failed":  # no good checkpoint to fall back to: the failure is named, with its traceback
        assert result.returncode != 0 and status["message"], status
        assert status["message"].split(": ", 1)[1] in (run_dir / "error.txt").read_text()
    else:  # or the engine fell back to training afresh, saying so
        assert result.returncode == 0 and status["message"].startswith("completed at step 4"), status


# ---------------------------------------------------------------------------- a second failure


def test_second_failure_shows_its_own_traceback(tmp_path, caplog):
    """Two failing attempts in one run folder, with different mistakes: the status and error.txt name the second."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir)
    config["data"] = {"shards": str(shards), "caption_dropout": 0.1}  # no empty-caption features in the shards
    path = write_config(config, tmp_path / "config.json")
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--config", str(path)]) == 2
    first_message = read_status(run_dir)["message"]
    assert "empty caption" in first_message

    config["data"] = {"shards": str(tmp_path / "elsewhere"), "caption_dropout": 0.0}  # a different mistake
    (tmp_path / "elsewhere").mkdir()
    write_config(config, path)
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--config", str(path)]) == 2
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["message"] != first_message, status
    error_text = (run_dir / "error.txt").read_text()
    assert error_text.startswith(status["message"]) and "empty caption" not in error_text
    assert "empty caption" in (run_dir / "previous-error.txt").read_text()
    assert "empty caption" not in (run_dir / "error-rank0.txt").read_text()


def test_launcher_clears_the_previous_attempts_errors_before_starting(tmp_path):
    (tmp_path / "error.txt").write_text("rank 0: ValueError: an old mistake\n")
    (tmp_path / "error-rank1.txt").write_text("old traceback\n")
    write_status(tmp_path, "failed", "rank 0: ValueError: an old mistake", rank=0)
    code = launch.supervise([sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path, timeout_s=60)
    assert code == 3
    status = read_status(tmp_path)
    assert status["state"] == "failed" and "exited with code 3" in status["message"], status
    assert "old mistake" not in status["message"] and not (tmp_path / "error.txt").exists()
    assert (tmp_path / "previous-error.txt").read_text().startswith("rank 0: ValueError: an old mistake")
    assert (tmp_path / "previous-error-rank1.txt").is_file()


def test_a_linked_error_file_is_removed_not_followed(tmp_path):
    (tmp_path / "elsewhere.txt").write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "error.txt").symlink_to(tmp_path / "elsewhere.txt")
    assert failure.rotate_errors(tmp_path / "run") == []
    failure.write_failure(failure.RunContext(run_dir=tmp_path / "run"), ValueError("this attempt"))
    assert read_status(tmp_path / "run")["message"] == "rank 0: ValueError: this attempt"
    assert (tmp_path / "elsewhere.txt").read_text() == "keep"


# ---------------------------------------------------------------------------- a full disk


class FullDisk:
    """From `fill()` on, no file can be created or grown (ENOSPC), as on a full disk; existing blocks can still be
    rewritten in place. Patches the one atomic writer every status, traceback and summary goes through, the
    exclusive error.txt creation, and the events file's writes."""

    def __init__(self, monkeypatch) -> None:
        self.full = False
        real_atomic_write, real_mkstemp = training.atomic.atomic_write, failure.tempfile.mkstemp

        def atomic_write(path, write, **options):
            self.check(path)
            return real_atomic_write(path, write, **options)

        def mkstemp(*args, **kwargs):
            self.check(kwargs.get("dir", ""))
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr(training.atomic, "atomic_write", atomic_write)
        monkeypatch.setattr(failure.tempfile, "mkstemp", mkstemp)

    def fill(self) -> None:
        self.full = True

    def check(self, path) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_during_training_ends_failed_not_running(tmp_path, monkeypatch):
    disk = FullDisk(monkeypatch)
    real_step = events.RunLog.step

    def step(log, metrics):
        if metrics["step"] == 2:
            disk.fill()
        if disk.full:
            disk.check(log.run_dir / events.EVENTS_FILE)
        real_step(log, metrics)

    monkeypatch.setattr(events.RunLog, "step", step)
    run_dir = tmp_path / "run"
    config = TrainConfig.from_dict(tiny_config(run_dir, steps=4, save_every=1))
    with pytest.raises(OSError) as raised:
        run_training(config)
    assert raised.value.errno == errno.ENOSPC
    status = read_status(run_dir)
    assert status["state"] == "failed", status
    assert "the disk is full" in status["message"] and str(run_dir) in status["message"], status


def test_status_on_a_full_disk_is_rewritten_in_place(tmp_path, monkeypatch):
    write_status(tmp_path, "running", "step 7 of 100")
    disk = FullDisk(monkeypatch)
    disk.fill()
    write_status(tmp_path, "failed", "rank 0: the disk is full")
    status = read_status(tmp_path)
    assert status["state"] == "failed" and status["message"] == "rank 0: the disk is full"
    assert (tmp_path / events.STATUS_FILE).read_text().endswith("}\n")  # no padding left behind


def test_status_that_cannot_be_written_at_all_raises(tmp_path, monkeypatch, caplog):
    disk = FullDisk(monkeypatch)
    disk.fill()  # no status file yet: nothing to rewrite in place
    with caplog.at_level(logging.ERROR), pytest.raises(OSError) as raised:
        write_status(tmp_path, "failed", "x")
    assert raised.value.errno == errno.ENOSPC and "final status is lost" in caplog.text


def test_launcher_refuses_a_linked_log_and_frees_the_folder(tmp_path):
    (tmp_path / "elsewhere.txt").write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / launch.LOG_FILE).symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(ValueError, match="is a link"):
        launch.supervise([sys.executable, "-c", "pass"], tmp_path / "run", timeout_s=60)
    assert (tmp_path / "elsewhere.txt").read_text() == "keep"
    assert not (tmp_path / "run" / ".whetstone.lock").exists()  # released


@pytest.mark.slow
def test_ctrl_c_to_the_cli_launcher_stops_the_run_politely(tmp_path):
    """``train --nproc-per-node 1``: the launcher forwards SIGINT once; the engine saves and the status says stopped."""
    import signal
    import time

    run_dir = tmp_path / "run"
    path = write_config(tiny_config(run_dir, steps=1_000_000, save_every=0), tmp_path / "config.json")
    command = [sys.executable, "-m", "training", "train", "--config", str(path), "--nproc-per-node", "1"]
    launcher = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ((run_dir / "events.jsonl").is_file() and (run_dir / "events.jsonl").read_text().strip()):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read().decode()[-3000:]
        time.sleep(0.1)
    launcher.send_signal(signal.SIGINT)
    _, stderr = launcher.communicate(timeout=120)
    status = read_status(run_dir)
    assert launcher.returncode == 0, stderr.decode()[-3000:]
    assert status["state"] == "stopped" and status["message"].startswith("stopped at step"), status
    assert (run_dir / "lora.safetensors").is_file() and not (run_dir / ".whetstone.lock").exists()
