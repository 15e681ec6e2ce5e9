"""The LoRA saves during a run are written off the training thread (issue 12: 1.75–2.26 s of GPU idle per save at
r128 on an H200), and a write that fails still fails the run, naming the file."""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import threading
import time

import pytest
import torch
from safetensors import safe_open
from test_engine_runs import tiny_config

from training.engine.background_writes import BackgroundWriteFailed, BackgroundWrites
from training.engine.config import TrainConfig
from training.engine.trainer import Trainer, run_training
from training.model.lora import LoraSettings
from training.model.lora_file import StagedLoraFile, stage_lora_file
from training.run.events import read_events, read_status


def test_submit_returns_before_the_write_and_wait_returns_after_it(tmp_path):
    release, threads, order = threading.Event(), [], []

    def write(name):
        def run():
            assert release.wait(10)
            threads.append(threading.current_thread().name)
            order.append(name)

        return run

    writes = BackgroundWrites()
    writes.submit("a", write("a"))
    writes.submit("b", write("b"))
    assert order == []  # both queued, neither written: the caller was not held
    release.set()
    writes.wait()
    assert order == ["a", "b"]
    assert all(name.startswith("result-write") for name in threads)
    writes.close()


def test_a_failed_write_is_raised_by_wait_naming_its_file_and_later_writes_still_run(tmp_path):
    done, queued = [], threading.Event()

    def fail():
        assert queued.wait(10)  # the second write is queued before this one fails
        raise OSError(28, "No space left on device")

    writes = BackgroundWrites()
    writes.submit("/runs/a/lora.safetensors", fail)
    writes.submit("/runs/a/lora_ema.safetensors", lambda: done.append("ema"))
    queued.set()
    with pytest.raises(BackgroundWriteFailed, match=r"writing /runs/a/lora.safetensors failed: OSError: .*No space"):
        writes.wait()
    assert done == ["ema"]
    writes.wait()  # reported once
    writes.close()


def test_a_failure_already_finished_is_raised_by_the_next_submit_before_it_queues():
    writes = BackgroundWrites()
    writes.submit("first.safetensors", lambda: 1 / 0)
    concurrent.futures.wait([future for _, future in writes._pending])  # the worker has run it
    queued = []
    with pytest.raises(BackgroundWriteFailed, match="writing first.safetensors failed: ZeroDivisionError"):
        writes.submit("later.safetensors", lambda: queued.append("later"))
    writes.close()
    assert queued == []  # refused before it was queued


def test_failed_never_waits_for_a_running_write_and_tells_a_finished_failure():
    release = threading.Event()
    writes = BackgroundWrites()
    writes.submit("slow.safetensors", lambda: release.wait(10))
    started = time.perf_counter()
    assert not writes.failed()
    assert time.perf_counter() - started < 1
    release.set()
    writes.wait()
    writes.submit("bad.safetensors", lambda: 1 / 0)
    concurrent.futures.wait([future for _, future in writes._pending])
    assert writes.failed()
    with pytest.raises(BackgroundWriteFailed, match="writing bad.safetensors failed"):
        writes.wait()
    assert not writes.failed()
    writes.close()


def test_a_stalled_write_times_out_naming_its_file_and_stays_pending(caplog):
    release = threading.Event()
    writes = BackgroundWrites(timeout_s=0.05)
    writes.submit("/slow/disk/lora.safetensors", lambda: release.wait(10))
    with pytest.raises(TimeoutError, match=r"writing /slow/disk/lora.safetensors did not finish within 0.05 s"):
        writes.wait()
    with caplog.at_level(logging.ERROR, logger="training.engine.background_writes"):
        started = time.perf_counter()
        writes.close(raise_error=False)  # cleanup after another error: does not hang on the stalled write
        assert time.perf_counter() - started < 1
    assert "did not finish within 0.05 s" in caplog.text
    release.set()
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        BackgroundWrites(timeout_s=0)


def test_close_after_another_error_logs_the_failure_instead_of_raising(caplog):
    writes = BackgroundWrites()
    writes.submit("x.safetensors", lambda: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="training.engine.background_writes"):
        writes.close(raise_error=False)
    assert "writing x.safetensors failed: ZeroDivisionError" in caplog.text
    writes.close()  # idempotent


def test_a_staged_lora_file_holds_copies_taken_at_staging(tmp_path):
    settings = LoraSettings(rank=2, targets="attention")
    state = {
        "layers.0.attention.out.lora_A.weight": torch.ones(2, 8),
        "layers.0.attention.out.lora_B.weight": torch.full((8, 2), 0.5),
    }
    staged = stage_lora_file(state, settings, metadata={"steps": "7"})
    for tensor in state.values():
        tensor.mul_(3)  # training goes on before the background write
    staged.write(tmp_path / "lora.safetensors")
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as handle:
        values = {key.rsplit(".", 2)[-2]: handle.get_tensor(key) for key in handle.keys() if key.endswith(".weight")}
        assert handle.metadata()["steps"] == "7"
    assert torch.equal(values["lora_A"], torch.ones(2, 8, dtype=torch.bfloat16))
    assert torch.equal(values["lora_B"], torch.full((8, 2), 0.5, dtype=torch.bfloat16))


def _record_writes(monkeypatch, hold_first_until_step: int | None = None, fail_step: str | None = None):
    """Each LoRA write's (thread, steps metadata); optionally the first write waits until training reached a step."""
    written, reached = [], threading.Event()
    original_write, original_preview = StagedLoraFile.write, Trainer._preview

    def write(self, path):
        if hold_first_until_step is not None and not written and not reached.wait(10):
            raise AssertionError(f"training did not reach step {hold_first_until_step} while the first save wrote")
        written.append((threading.current_thread().name, self.header["steps"]))
        if self.header["steps"] == fail_step:
            raise OSError(28, "No space left on device")
        original_write(self, path)

    def preview(self):
        if hold_first_until_step is not None and self.step >= hold_first_until_step:
            reached.set()
        original_preview(self)

    monkeypatch.setattr(StagedLoraFile, "write", write)
    monkeypatch.setattr(Trainer, "_preview", preview)
    return written


def test_saves_during_a_run_write_in_the_background_while_training_goes_on(tmp_path, monkeypatch):
    """Regression (issue 12): the step-1 save's write is held until training has finished step 2 (the step-2 save
    then waits for it: one save in flight); a save in the training thread would hold step 2 back and the write would
    give up. The final save writes in the caller."""
    written = _record_writes(monkeypatch, hold_first_until_step=2)
    config = tiny_config(tmp_path / "run", steps=4, save_every=1, grad_accum=1, micro_batch=2)
    assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    assert [steps for _, steps in written] == ["1", "2", "3", "4"]
    assert [name.startswith("result-write") for name, _ in written] == [True, True, True, False]
    with safe_open(str(tmp_path / "run" / "lora.safetensors"), "pt") as handle:
        assert handle.metadata()["steps"] == "4"
    assert read_status(tmp_path / "run")["state"] == "completed"


def test_a_background_write_that_fails_fails_the_run_naming_the_file(tmp_path, monkeypatch):
    written = _record_writes(monkeypatch, fail_step="2")
    config = tiny_config(tmp_path / "run", steps=6, save_every=2, grad_accum=1, micro_batch=2)
    lora = tmp_path / "run" / "lora.safetensors"
    with pytest.raises(BackgroundWriteFailed, match=f"writing {lora} failed: OSError"):
        run_training(TrainConfig.from_dict(copy.deepcopy(config)))
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed", status
    assert f"the disk is full (No space left on device): free space on the drive of {lora.parent}" in status["message"]
    assert [steps for _, steps in written] == ["2"]  # nothing staged after the failure
    # stopped by the step after the failed write (logged up to step 2 or 3), at the latest by the step-4 save
    assert max(event["step"] for event in read_events(tmp_path / "run")) <= 4
    assert not lora.exists()  # atomic: the failed write left nothing behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_copy_is_a_contiguous_cpu_copy_in_the_asked_dtype_never_a_view(dtype):
    from training.model.safetensors_io import host_copy

    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # not contiguous
    copied = host_copy(source, dtype)
    assert copied.device.type == "cpu" and copied.dtype == dtype and copied.is_contiguous()
    assert torch.equal(copied.float(), source)
    same = host_copy(copied, dtype)  # already CPU, contiguous, in dtype: still a copy
    assert same.data_ptr() != copied.data_ptr()
    copied.add_(1)
    assert torch.equal(same.float(), source)
    rows = torch.arange(12, dtype=dtype).reshape(3, 4)
    tail = host_copy(rows[1:], dtype)  # contiguous, in dtype, a view at an offset: still a copy
    rows.zero_()
    assert tail.float().sum() == sum(range(4, 12))


def test_a_divergence_while_the_last_write_fails_says_the_lora_was_not_written(tmp_path, monkeypatch):
    """The divergence message waits for the last save's write: it never claims a file is kept that is not."""
    from test_engine_diverge import POISONED_STEP, diverging_config, poison_batches

    from training.engine.divergence import TrainingDiverged

    _record_writes(monkeypatch, fail_step=str(POISONED_STEP - 1))
    poison_batches(monkeypatch, from_step=POISONED_STEP)
    with pytest.raises(TrainingDiverged) as raised:
        run_training(TrainConfig.from_dict(diverging_config(tmp_path / "run")))
    message = str(raised.value)
    assert f"the LoRA of step {POISONED_STEP - 1} was not written (writing " in message
    assert "No space left on device" in message and "its checkpoint is kept" in message


def test_a_resumed_run_with_nothing_left_to_train_rewrites_its_result(tmp_path):
    """A kill between an async checkpoint and the LoRA's background write can leave the file of an earlier save
    beside the checkpoint; resuming with nothing left to train writes the checkpoint's result again."""
    config = tiny_config(tmp_path / "run", steps=4, save_every=2, grad_accum=1, micro_batch=2)
    assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    lora = tmp_path / "run" / "lora.safetensors"
    written = lora.read_bytes()
    lora.unlink()
    assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    assert lora.read_bytes() == written


def test_an_ema_run_writes_the_lora_and_its_ema_twin_in_the_background(tmp_path, monkeypatch):
    written = _record_writes(monkeypatch)
    config = tiny_config(tmp_path / "run", steps=2, save_every=1, grad_accum=1, micro_batch=2)
    config["ema"] = {"placement": "device", "decay": 0.5}
    assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    assert [steps for _, steps in written] == ["1", "1", "2", "2"]  # LoRA, then its EMA twin, per save
    assert [name.startswith("result-write") for name, _ in written] == [True, True, False, False]
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        with safe_open(str(tmp_path / "run" / name), "pt") as handle:
            assert handle.metadata()["steps"] == "2"


RANK_0_WRITE_FAILS = """
import runpy, sys
from training.model.lora_file import StagedLoraFile


def write(self, path):  # only rank 0 writes the LoRA
    raise OSError(5, "Input/output error")


StagedLoraFile.write = write
sys.argv = ["training", "train", "--config", sys.argv[1]]
runpy.run_module("training", run_name="__main__")
"""


def test_when_rank_0s_background_write_fails_every_rank_stops_at_once(tmp_path):
    """The failure travels in the step's all-reduce: every rank stops at the same step, rank 1 saying why, and rank
    0's cause is the run's status. Before, rank 0 alone raised at its next save and rank 1 died in a collective when
    torchrun tore the group down (its log: a gloo connection error, not the cause)."""
    import os
    import subprocess
    import sys

    from test_engine_runs import REPO, write_config

    config = tiny_config(tmp_path / "run", steps=40, save_every=2, grad_accum=1, micro_batch=2, save_state=False)
    config["run"]["nccl_timeout_s"] = 600
    script = tmp_path / "rank_0_write_fails.py"
    script.write_text(RANK_0_WRITE_FAILS)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [*torchrun, str(script), str(write_config(config))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode != 0
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed", status
    assert "Input/output error" in status["message"], status
    assert "stopping with the rank whose background write of the result file failed" in result.stderr
    assert max(event["step"] for event in read_events(tmp_path / "run")) < 40
