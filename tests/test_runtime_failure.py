"""Failures: record() writes tracebacks and status; OOM messages name the next plan; kill -9 of one of two ranks.

Run as a script (under torchrun) this file is the 2-rank worker of the kill -9 test: a loop of all-reduces with the
engine's stop agreement, where rank 1 SIGKILLs itself after the first step.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from training.run import failure, launch
from training.run.events import read_status

PLAN = {"mode": "lora", "micro_batch": 4, "grad_accum": 1, "checkpoint_depth": 30, "n_layers": 30, "resolution": 1024}


@pytest.fixture(autouse=True)
def _unbind():
    yield
    failure._context = None


def test_record_writes_traceback_and_status(tmp_path):
    failure.bind_run(tmp_path, rank=0, world_size=2, plan=PLAN)

    @failure.record
    def entry():
        raise ValueError("data.shards /nowhere does not exist")

    with pytest.raises(ValueError):
        entry()
    status = read_status(tmp_path)
    assert status["state"] == "failed" and "rank 0: ValueError: data.shards /nowhere" in status["message"]
    assert "Traceback" in (tmp_path / "error-rank0.txt").read_text()
    assert (tmp_path / "error.txt").read_text().startswith("rank 0: ValueError")

    failure.bind_run(tmp_path, rank=1, world_size=2)  # a second failing rank: own traceback, first one's status kept
    with pytest.raises(ValueError):
        entry()
    assert (tmp_path / "error-rank1.txt").is_file()
    assert read_status(tmp_path)["rank"] == 0


def test_oom_names_plan_and_next_plan(tmp_path):
    failure.bind_run(tmp_path, rank=0, world_size=1, plan=PLAN)

    @failure.record
    def entry():
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.OutOfMemoryError as error:
            raise RuntimeError("step failed") from error

    with pytest.raises(RuntimeError):
        entry()
    message = read_status(tmp_path)["message"]
    assert "mode lora, micro-batch 4, checkpoint depth 30/30, 1024 px" in message
    assert "run.micro_batch 4 -> 2 and run.grad_accum 1 -> 2" in message


def test_next_plan_order():
    assert "checkpoint_depth 10 -> 17" in failure.next_plan_hint({**PLAN, "checkpoint_depth": 10})
    assert "qlora" in failure.next_plan_hint({**PLAN, "micro_batch": 1})
    assert "fsdp_cpu_offload" in failure.next_plan_hint({**PLAN, "micro_batch": 1, "mode": "full"})
    last = {"mode": "qlora", "micro_batch": 1, "resolution": 512}
    assert failure.next_plan(last)[0] is None and "more memory" in failure.next_plan_hint(last)


def test_plan_for_messages_from_config(tmp_path):
    from training.engine.config import RunSection, TrainConfig

    config = TrainConfig(
        run=RunSection(output_dir=str(tmp_path), micro_batch=2, checkpoint_depth=4), plan={"resolution": [768, 512]}
    )
    plan = failure.plan_for_messages(config, n_layers=30, world_size=2)
    assert failure.describe_plan(plan) == "mode lora, micro-batch 2, checkpoint depth 4/30, 768x512 px, 2 GPUs"
    assert "checkpoint_depth 4 -> 11" in failure.next_plan_hint(plan)


def test_settle_status_names_root_cause(tmp_path):
    output = _TORCHRUN_SUMMARY
    failure.write_failure(failure.RunContext(run_dir=tmp_path, rank=0, world_size=2), RuntimeError("Connection closed"))
    status = failure.settle_status(tmp_path, returncode=1, launcher_output=output)
    assert status["message"].startswith(
        "rank 1 (pid 11132 on node7) was killed by SIGKILL; the job stopped (then rank 0"
    )
    assert status["exit_code"] == -9 and status["rank"] == 1


_SURVIVOR_OBSERVED_FIRST = """
Failures:
[1]:
  time      : 2026-12-01_23:50:02
  host      : node7
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 11132)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 11132
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_23:50:01
  host      : node7
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 11131)
  error_file: /tmp/error.json
  traceback : RuntimeError: Connection closed by peer
"""


def test_a_killed_rank_is_the_cause_even_when_torchrun_saw_the_survivor_fail_first(tmp_path):
    """Regression (seen under load): rank 0 recorded its failed collective before torchrun noticed the SIGKILL of
    rank 1, so torchrun named rank 0 the root cause; the status must still name the kill."""
    failure.write_failure(failure.RunContext(run_dir=tmp_path, rank=0, world_size=2), RuntimeError("Connection closed"))
    status = failure.settle_status(tmp_path, returncode=1, launcher_output=_SURVIVOR_OBSERVED_FIRST)
    assert status["message"].startswith("rank 1 (pid 11132 on node7) was killed by SIGKILL"), status
    assert status["rank"] == 1


def test_a_rank_that_fails_on_its_own_stays_the_cause(tmp_path):
    """A genuine error on rank 0 (not a collective) stays the cause, whatever torchrun did to the others after it."""
    failure.write_failure(failure.RunContext(run_dir=tmp_path, rank=0, world_size=2), ValueError("bad batch"))
    status = failure.settle_status(tmp_path, returncode=1, launcher_output=_SURVIVOR_OBSERVED_FIRST)
    assert status["rank"] == 0 and "bad batch" in status["message"], status


def test_settle_status_keeps_honoured_stop_and_flags_silent_exit(tmp_path):
    from training.run.events import write_status

    write_status(tmp_path, "stopped", "SIGTERM: saved at step 3")
    assert failure.settle_status(tmp_path, returncode=1)["state"] == "stopped"
    write_status(tmp_path, "running")
    assert "without reporting" in failure.settle_status(tmp_path, returncode=0)["message"]


_TORCHRUN_SUMMARY = """
Failures:
[1]:
  time      : 2026-11-26_18:03:14
  host      : node7
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 11131)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 11131
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-26_18:03:14
  host      : node7
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 11132)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 11132
"""


# ---------------------------------------------------------------------------- kill -9 of one rank


@pytest.mark.slow
def test_kill_one_rank_ends_job_with_clear_status(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--standalone", "--nproc-per-node", "2", "--max-restarts", "0", __file__, str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    returncode = launch.supervise(command, tmp_path, timeout_s=90, env=env)
    elapsed = time.monotonic() - started
    status = read_status(tmp_path)
    log = (tmp_path / launch.LOG_FILE).read_text()
    assert elapsed < 60, f"job took {elapsed:.0f} s to end:\n{log[-3000:]}"
    assert returncode != 0
    assert status["state"] == "failed", status
    assert status["message"].startswith("rank 1 (pid") and "SIGKILL" in status["message"], status
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events and events[0]["step"] == 1


@pytest.mark.slow
def test_kill_one_rank_of_real_training(tmp_path):
    """The same with the engine's `train` subcommand under the launcher users run (the Train node's, the CLI's
    ``--nproc-per-node``): rank 1 is killed from outside once a step was logged."""
    import threading

    from training.engine.config import DataSection, ModelSection, RunSection, TrainConfig

    config = TrainConfig(
        run=RunSection(output_dir=str(tmp_path), steps=100_000, micro_batch=1, save_every=0),
        model=ModelSection(preset="tiny", dtype="fp32"),
        data=DataSection(synthetic=True, resolution=64, caption_tokens=16),
    )
    config.save(tmp_path / "config.json")
    command = launch.train_command(tmp_path / "config.json", 2)  # exactly what the Train node and the CLI launch
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    codes = []
    thread = threading.Thread(target=lambda: codes.append(launch.supervise(command, tmp_path, timeout_s=150, env=env)))
    thread.start()
    victim = _wait_for_rank_after_first_step(tmp_path, rank=1, deadline=time.monotonic() + 90)
    killed = time.monotonic()
    victim.kill()
    thread.join(timeout=120)
    elapsed = time.monotonic() - killed
    status = read_status(tmp_path)
    assert not thread.is_alive() and elapsed < 60, f"job took {elapsed:.0f} s to end after the kill"
    assert codes[0] != 0 and status["state"] == "failed", status
    assert status["message"].startswith(f"rank 1 (pid {victim.pid}") and "SIGKILL" in status["message"], status


def _wait_for_rank_after_first_step(run_dir: Path, *, rank: int, deadline: float):
    import psutil

    while time.monotonic() < deadline:
        if (run_dir / "events.jsonl").is_file() and (run_dir / "events.jsonl").read_text().strip():
            for process in psutil.Process().children(recursive=True):
                try:
                    if process.environ().get("RANK") == str(rank) and "training" in " ".join(process.cmdline()):
                        return process
                except psutil.Error:
                    continue
        time.sleep(0.2)
    log = (run_dir / launch.LOG_FILE).read_text() if (run_dir / launch.LOG_FILE).is_file() else ""
    raise AssertionError(f"rank {rank} never logged a step:\n{log[-3000:]}")


def _worker(run_dir: str) -> None:
    import torch.distributed as dist

    from training.engine.signals import GracefulStop
    from training.run.events import RunLog

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    failure.bind_run(run_dir, rank=rank, world_size=world, plan=PLAN)
    with GracefulStop() as stop, RunLog(run_dir, rank=rank, world_size=world) as log:
        log.status("running")
        for step in range(1, 10_000):
            value = torch.ones(1024)
            dist.all_reduce(value)
            log.step({"step": step, "loss": 1.0 / step})
            if step == 1 and rank == 1:
                os.kill(os.getpid(), 9)
            if stop.should_stop():
                log.status("stopped", f"{stop.signal_name} at step {step}")
                return
            time.sleep(0.02)


if __name__ == "__main__":
    failure.record(_worker)(sys.argv[1])


def test_oom_advice_is_the_planners_policy():
    from training.hardware import advice

    assert failure.next_plan is advice.next_plan
    after_modes = {"mode": "qlora", "micro_batch": 1, "resolution": [1024, 768]}  # a bucketed (width, height) plan
    assert advice.next_plan(after_modes)[1] == "train at 512 px (pack the data at that resolution)"
    assert advice.next_plan({"mode": "lora", "micro_batch": 1})[0]["mode"] == advice.LIGHTER_MODE["lora"]
