"""One exclusive lock per folder: a second training in a run folder, or a second pack into an output folder, is refused
with exit code 2 and a message naming the folder and the holding process; the lock goes with its holder (kill -9).

The trainings are real CLI processes on the tiny model (synthetic data, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from data_fixtures import noise_image, save_image

from training.__main__ import main
from training.lock import LOCK_FILE, FolderBusy, FolderLock, read_holder
from training.run.events import read_status

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
HOLD = "import sys, time; from training.lock import FolderLock; FolderLock(sys.argv[1], sys.argv[2]).acquire(); "
HOLD += "print('held', flush=True); time.sleep(600)"


def hold_in_child(folder: Path, purpose: str) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), purpose], cwd=REPO, env=ENV, stdout=subprocess.PIPE
    )
    assert child.stdout.readline().strip() == b"held"
    return child


def kill9(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_second_holder_is_refused_with_folder_and_pid_and_kill_releases(tmp_path):
    child = hold_in_child(tmp_path / "run", "training")
    try:
        with pytest.raises(FolderBusy) as refused:
            FolderLock(tmp_path / "run", "training").acquire()
        message = str(refused.value)
        assert str(tmp_path / "run") in message and f"process {child.pid}" in message and "training" in message
    finally:
        kill9(child)
    with FolderLock(tmp_path / "run", "training") as lock:  # the kernel released the dead holder's lock
        assert read_holder(lock.path) == os.getpid()
    with FolderLock(tmp_path / "run", "training"):  # and released again on exit, leaving no file behind
        pass
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_lock_in_the_same_process_is_refused_too(tmp_path):
    with FolderLock(tmp_path, "pack"), pytest.raises(FolderBusy, match=f"process {os.getpid()}"):
        FolderLock(tmp_path, "pack").acquire()


def test_lock_file_link_is_not_followed(tmp_path):
    (tmp_path / "elsewhere").write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        FolderLock(tmp_path / "run", "training").acquire()
    assert (tmp_path / "elsewhere").read_text() == "keep"


# ---------------------------------------------------------------------------- CLI trainings


def tiny_config(run_dir: Path, steps: int, name: str = "config.json") -> Path:
    config = {
        "run": {"output_dir": str(run_dir), "steps": steps, "micro_batch": 1, "save_every": 0, "checkpoint_depth": 0},
        "model": {"preset": "tiny", "dtype": "fp32"},
        "lora": {"rank": 2},
        "data": {"synthetic": True, "resolution": 32, "caption_tokens": 8, "caption_dropout": 0.0},
    }
    path = run_dir.parent / f"{run_dir.name}-{name}"
    path.write_text(json.dumps(config))
    return path


def train_cli(config: Path, *extra: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "training", "train", "--config", str(config), *extra]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout_s)


def start_cli(config: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "training", "train", "--config", str(config), *extra]
    return subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_steps(run_dir: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ((run_dir / "events.jsonl").is_file() and (run_dir / "events.jsonl").read_text().strip()):
        assert process.poll() is None, f"the first training ended early with code {process.returncode}"
        assert time.monotonic() < deadline, "the first training logged no step"
        time.sleep(0.1)


@pytest.mark.slow
def test_second_cli_training_in_the_folder_is_refused_and_kill9_frees_it(tmp_path):
    run_dir = tmp_path / "run"
    first = start_cli(tiny_config(run_dir, steps=1_000_000))
    try:
        wait_for_steps(run_dir, first)
        second = train_cli(tiny_config(run_dir, steps=2, name="second.json"), timeout_s=90)
        assert second.returncode == 2, second.stderr[-3000:]
        assert str(run_dir) in second.stderr and f"process {first.pid}" in second.stderr, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert read_status(run_dir)["pid"] == first.pid  # the refused run wrote nothing into the folder
    finally:
        kill9(first)
    third = train_cli(tiny_config(run_dir, steps=2, name="third.json"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert read_status(run_dir)["state"] == "completed"


@pytest.mark.slow
def test_launched_run_keeps_the_folder_when_its_launcher_dies(tmp_path):
    """The launcher (CLI --nproc-per-node 1, as the Train node) holds the folder and hands the lock to its child:
    kill -9 of the launcher leaves the training holding it; a direct run is refused, naming the training's pid."""
    run_dir = tmp_path / "run"
    launcher = start_cli(tiny_config(run_dir, steps=1_000_000), "--nproc-per-node", "1")
    wait_for_steps(run_dir, launcher)
    trainer_pid = read_status(run_dir)["pid"]
    assert trainer_pid != launcher.pid
    kill9(launcher)
    try:
        refused = train_cli(tiny_config(run_dir, steps=2, name="second.json"), timeout_s=90)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"process {trainer_pid}" in refused.stderr, refused.stderr[-2000:]
    finally:
        os.kill(trainer_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while FolderLock(run_dir, "probe").path.exists() and _held(run_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    done = train_cli(tiny_config(run_dir, steps=2, name="third.json"))
    assert done.returncode == 0, done.stderr[-3000:]


def _held(folder: Path) -> bool:
    try:
        FolderLock(folder, "probe").acquire().release()
    except FolderBusy:
        return True
    return False


# ---------------------------------------------------------------------------- packs


def test_second_pack_into_an_output_is_refused_and_kill9_frees_it(tmp_path, capsys):
    images = tmp_path / "images"
    for index in range(3):
        save_image(images / f"{index}.png", noise_image(96, 80, seed=index))
    output = tmp_path / "shards"
    holder = hold_in_child(output, "pack")
    try:
        code = main(["pack", str(images), str(output), "--resolution", "64"])
        err = capsys.readouterr().err
        assert code == 2 and str(output) in err and f"process {holder.pid}" in err and "pack" in err, err
        assert "Traceback" not in err
        assert not list(output.glob("*.tar")) and not (output / "manifest.json").exists()
    finally:
        kill9(holder)
    assert main(["pack", str(images), str(output), "--resolution", "64"]) == 0
    assert (output / "manifest.json").is_file()
