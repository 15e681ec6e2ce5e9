"""Background jobs (issue 21): the queue file, GPU assignment, state from the run folder, and the scheduler running
real CPU trainings (tiny model, synthetic data) on fake GPU sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from training.lock import FolderLock, folder_locked
from training.run import jobs
from training.run.events import read_status, write_status
from training.run.jobs import JobRecord, JobStore
from training.run.scheduler import Scheduler

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- records and the queue file


def test_record_round_trips_and_refuses_bad_values():
    record = JobRecord(run="a", gpu_count=2, gpu_ids=(1, 3), world_size=2, queued_at=5.0, assigned=(1, 3))
    assert JobRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    for bad, key in (
        ({"run": "../x"}, "run"),
        ({"run": ".hidden"}, "run"),
        ({"run": "a", "gpu_count": -1}, "gpu_count"),
        ({"run": "a", "gpu_count": 10**9}, "gpu_count"),
        ({"run": "a", "world_size": 0}, "world_size"),
        ({"run": "a", "gpu_count": 1, "gpu_ids": [1, 1]}, "twice"),
        ({"run": "a", "gpu_count": 1, "gpu_ids": [0, 1]}, "gpu_count=1"),
        ({"run": "a", "assigned": [True]}, "assigned"),
        ({"run": "a", "pid": "1; rm -rf /"}, "pid"),
        ({"run": "a", "command": ["sh"]}, "unknown keys"),
    ):
        with pytest.raises(ValueError, match=key):
            JobRecord.from_dict(bad)


def test_store_round_trips_in_fifo_order_and_survives_hostile_files(tmp_path):
    store = JobStore(tmp_path)
    with store.edit() as records:
        records += [JobRecord(run="b", queued_at=1.0), JobRecord(run="a", queued_at=2.0)]
    assert [r.run for r in store.read()] == ["b", "a"]
    assert not list(store.folder.glob("*.tmp")) and not (store.folder / ".whetstone.lock").exists()
    store.path.write_text("{not json")
    assert store.read() == []
    store.path.write_text(json.dumps({"jobs": [{"run": "../../etc"}, {"run": "ok", "gpu_count": 1}, 7, {"run": "ok"}]}))
    assert [(r.run, r.gpu_count) for r in store.read()] == [("ok", 1)]  # bad ones dropped, duplicate ignored
    store.path.write_text(json.dumps([1, 2]))
    assert store.read() == []


def test_store_never_goes_through_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / jobs.JOBS_FILE).write_text(json.dumps({"jobs": [{"run": "x"}]}))
    root = tmp_path / "runs"
    root.mkdir()
    (root / jobs.JOBS_DIR).symlink_to(outside)
    store = JobStore(root)
    assert store.read() == []
    with pytest.raises(ValueError, match="link"):
        with store.edit():
            pass
    assert json.loads((outside / jobs.JOBS_FILE).read_text()) == {"jobs": [{"run": "x"}]}


# ---------------------------------------------------------------------------- GPU assignment


def test_choose_gpus_takes_free_ones_or_the_pinned_set():
    any_two = JobRecord(run="a", gpu_count=2, world_size=2)
    assert jobs.choose_gpus(any_two, [0, 1, 2, 3], set()) == (0, 1)
    assert jobs.choose_gpus(any_two, [0, 1, 2, 3], {0, 2}) == (1, 3)
    assert jobs.choose_gpus(any_two, [0, 1, 2, 3], {0, 1, 2}) is None
    pinned = JobRecord(run="b", gpu_count=2, gpu_ids=(2, 3), world_size=2)
    assert jobs.choose_gpus(pinned, [0, 1, 2, 3], {0, 1}) == (2, 3)
    assert jobs.choose_gpus(pinned, [0, 1, 2, 3], {3}) is None
    cpu = JobRecord(run="c")
    assert jobs.choose_gpus(cpu, [], set()) == ()


def test_requests_that_can_never_start_are_refused():
    with pytest.raises(ValueError, match="needs 3 GPU"):
        jobs.check_request(3, None, [0, 1])
    with pytest.raises(ValueError, match=r"gpus \[5\] are not on this machine"):
        jobs.check_request(2, (1, 5), [0, 1])
    jobs.check_request(2, (0, 1), [0, 1])


def test_gpu_ids_text_and_the_childs_visible_devices():
    assert jobs.parse_gpu_ids(" auto ") is None and jobs.parse_gpu_ids("") is None
    assert jobs.parse_gpu_ids("0, 3") == (0, 3)
    for bad in ("0;1", "-1", "1,1", "a", "99999"):
        with pytest.raises(ValueError, match="gpus"):
            jobs.parse_gpu_ids(bad)
    assert jobs.child_visible_devices((0, 1), None) == "0,1"
    assert jobs.child_visible_devices((1,), "2,3") == "3"  # index 1 of a ComfyUI started on GPUs 2 and 3
    assert jobs.child_visible_devices((0,), "GPU-abc,GPU-def") == "GPU-abc"
    assert jobs.child_visible_devices((), None) == ""
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        jobs.child_visible_devices((2,), "2,3")


def test_subset_profile_plans_for_free_gpus_first():
    from training.hardware.discovery import GpuInfo, HardwareProfile

    def gpu(free_gib):
        return GpuInfo(
            name="H100", total_bytes=80 << 30, free_bytes=free_gib << 30, compute_capability=(9, 0), fp8=True
        )

    machine = HardwareProfile(gpus=(gpu(10), gpu(78), gpu(12), gpu(77)), link="nvlink", cpu_cores=8)
    profile, chosen, reason = jobs.subset_profile(machine, 2, held={0, 2})
    assert chosen == (1, 3) and [g.free_bytes >> 30 for g in profile.gpus] == [78, 77] and "held: [0, 2]" in reason
    profile, chosen, reason = jobs.subset_profile(machine, 3, held={0, 2})
    assert chosen == (1, 3, 0) and [g.free_bytes >> 30 for g in profile.gpus] == [78, 77, 78], "busy: as when freed"
    assert "[0] are held by other jobs" in reason
    with pytest.raises(ValueError, match="gpu_count=5"):
        jobs.subset_profile(machine, 5)


# ---------------------------------------------------------------------------- state and liveness


def hold_in_child(folder: Path) -> subprocess.Popen:
    code = f"from training.lock import FolderLock; import sys, time; FolderLock({str(folder)!r}, 't').acquire(); "
    code += "print('held', flush=True); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_state_comes_from_status_and_the_lock_not_from_a_pid(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    record = JobRecord(run="r", queued_at=1.0)
    assert jobs.job_state(run_dir, record)[0] == "queued"
    assert jobs.job_state(run_dir, None) == ("", "")
    launched = JobRecord(run="r", launched_at=2.0, pid=os.getpid(), pid_start=jobs.process_start_ticks(os.getpid()))
    write_status(run_dir, "running", "step 3 of 9")
    assert jobs.job_state(run_dir, launched) == ("failed", jobs.ENDED_UNREPORTED), "unlocked 'running' is dead"
    child = hold_in_child(run_dir)
    try:
        assert jobs.job_state(run_dir, launched) == ("running", "step 3 of 9")
        launched.stop_requested_at = 3.0
        assert jobs.job_state(run_dir, launched)[0] == "stopping"
        # our own pid with the right start time, but it does not hold the lock file: not the job's process
        assert jobs.verified_pid(tmp_path, launched) is None
        holder = JobRecord(run="r", launched_at=2.0, pid=child.pid, pid_start=jobs.process_start_ticks(child.pid))
        assert jobs.verified_pid(tmp_path, holder) == child.pid
        reused = JobRecord(run="r", launched_at=2.0, pid=child.pid, pid_start=holder.pid_start + 1)
        assert jobs.verified_pid(tmp_path, reused) is None, "a reused pid has another start time"
        write_status(run_dir, "stopped", "stopped at step 4 of 9")
        assert jobs.job_state(run_dir, launched)[0] == "stopping", "final only once the process let the folder go"
    finally:
        child.kill()
        child.wait()
    write_status(run_dir, "stopped", "stopped at step 4 of 9")
    assert jobs.job_state(run_dir, launched) == ("stopped", "stopped at step 4 of 9")


# ---------------------------------------------------------------------------- the scheduler, real CPU trainings


def tiny_config(run_dir: Path, steps: int) -> None:
    config = {
        "run": {"output_dir": str(run_dir), "steps": steps, "micro_batch": 1, "checkpoint_depth": 0, "save_every": 0},
        "model": {"preset": "tiny", "dtype": "fp32"},
        "lora": {"rank": 2},
        "data": {"synthetic": True, "resolution": 32, "caption_tokens": 8, "caption_dropout": 0.0},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config))


def wait_until(predicate, what: str, timeout_s: float = 120.0, scheduler: Scheduler | None = None):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if scheduler is not None:
            scheduler.tick()
        time.sleep(0.2)


def has_steps(run_dir: Path) -> bool:
    path = run_dir / "events.jsonl"
    return path.is_file() and b'"step"' in path.read_bytes()


def child_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.slow
def test_two_jobs_on_disjoint_gpus_then_the_queued_third_starts_when_one_ends(tmp_path):
    root = tmp_path / "runs"
    for name in ("first", "second", "third"):
        tiny_config(root / name, steps=1_000_000)
    scheduler = Scheduler(root, machine_gpus=[0, 1], cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": "4,7"})
    try:
        for name in ("first", "second", "third"):
            scheduler.submit(name, gpu_count=1, gpu_ids=None, world_size=1)
        records = {r.run: r for r in scheduler.store.read()}
        assert records["first"].assigned == (0,) and records["second"].assigned == (1,)
        assert not records["third"].launched and jobs.job_state(root / "third", records["third"])[0] == "queued"
        assert child_env(records["first"].pid)["CUDA_VISIBLE_DEVICES"] == "4"  # ComfyUI's GPU 0 is physical 4
        assert child_env(records["second"].pid)["CUDA_VISIBLE_DEVICES"] == "7"
        wait_until(lambda: has_steps(root / "first") and has_steps(root / "second"), "both jobs to train")
        assert all(jobs.job_state(root / n, records[n])[0] == "running" for n in ("first", "second"))
        scheduler.tick()
        assert not scheduler.store.read()[2].launched, "the third waits while both GPUs are held"

        assert scheduler.stop("first") == "stopping"
        wait_until(lambda: not folder_locked(root / "first"), "the first job to save and stop", scheduler=scheduler)
        assert read_status(root / "first")["state"] == "stopped"
        third = {r.run: r for r in scheduler.store.read()}["third"]
        assert third.launched and third.assigned == (0,), "the third job took the GPU the first one freed"
        assert child_env(third.pid)["CUDA_VISIBLE_DEVICES"] == "4"
    finally:
        for name in ("second", "third", "first"):
            scheduler.stop(name)
        wait_until(lambda: not scheduler.processes, "every job to stop", scheduler=scheduler)
    assert {read_status(root / n)["state"] for n in ("first", "second", "third")} == {"stopped"}


def test_fifo_a_waiting_pinned_job_is_not_overtaken(tmp_path):
    root = tmp_path / "runs"
    store = JobStore(root)
    blocker = root / "blocker"
    child = hold_in_child(blocker)
    try:
        with store.edit() as records:
            records.append(JobRecord(run="blocker", gpu_count=1, world_size=1, assigned=(0,), launched_at=1.0))
        scheduler = Scheduler(root, machine_gpus=[0, 1], command_for=lambda config, world: ["true"])
        scheduler.submit("pinned", gpu_count=1, gpu_ids=(0,), world_size=1)
        scheduler.submit("any", gpu_count=1, gpu_ids=None, world_size=1)
        assert [r.launched for r in store.read()] == [True, False, False], "GPU 1 is free, but 'pinned' came first"
    finally:
        child.kill()
        child.wait()
    scheduler.tick()
    launched = {r.run: r.assigned for r in store.read() if r.launched_at and r.run != "blocker"}
    assert launched == {"pinned": (0,), "any": (1,)}
    wait_until(lambda: not scheduler.processes, "the fake jobs to end", scheduler=scheduler)
    assert read_status(root / "pinned")["state"] == "failed", "'true' exits 0 without reporting: settled as failed"


@pytest.mark.slow
def test_a_job_outlives_its_launcher_and_a_new_scheduler_stops_it(tmp_path):
    root = tmp_path / "runs"
    tiny_config(root / "job", steps=1_000_000)
    launcher = textwrap.dedent(f"""
        from training.run.scheduler import Scheduler
        Scheduler({str(root)!r}, machine_gpus=[0], cwd={str(REPO)!r}).submit(
            "job", gpu_count=1, gpu_ids=None, world_size=1)
    """)
    subprocess.run([sys.executable, "-c", launcher], cwd=REPO, check=True, timeout=60)  # the "ComfyUI" exits
    wait_until(lambda: has_steps(root / "job"), "the orphaned job to train")
    restarted = Scheduler(root, machine_gpus=[0], cwd=REPO)
    record = restarted.store.read()[0]
    assert jobs.job_state(root / "job", record)[0] == "running" and folder_locked(root / "job")
    assert jobs.verified_pid(root, record) == record.pid
    assert restarted.stop("job") == "stopping"
    wait_until(lambda: not folder_locked(root / "job"), "the reattached job to stop")
    assert read_status(root / "job")["state"] == "stopped" and (root / "job" / "lora.safetensors").is_file()
    assert restarted.stop("job") == "not running"


def test_a_job_killed_while_its_launcher_is_gone_is_marked_failed(tmp_path):
    root = tmp_path / "runs"
    (root / "gone").mkdir(parents=True)
    write_status(root / "gone", "running", "step 5 of 10")
    with JobStore(root).edit() as records:
        records.append(JobRecord(run="gone", launched_at=1.0, pid=999_999, pid_start=1))
    Scheduler(root, machine_gpus=[]).tick()
    assert read_status(root / "gone") | {} and read_status(root / "gone")["state"] == "failed"
    assert jobs.ENDED_UNREPORTED in read_status(root / "gone")["message"]


def test_submit_refuses_a_running_run_and_stop_of_an_unknown_one(tmp_path):
    root = tmp_path / "runs"
    scheduler = Scheduler(root, machine_gpus=[0])
    with FolderLock(root / "busy", "training"):
        with JobStore(root).edit() as records:
            records.append(JobRecord(run="busy", gpu_count=1, assigned=(0,), launched_at=1.0))
        with pytest.raises(ValueError, match="already queued or running"):
            scheduler.submit("busy", gpu_count=1, gpu_ids=None, world_size=1)
    with pytest.raises(LookupError, match="no job 'nope'"):
        scheduler.stop("nope")
    with pytest.raises(ValueError, match="needs 2 GPU"):
        scheduler.submit("big", gpu_count=2, gpu_ids=None, world_size=2)


def test_a_stop_waits_until_the_engine_can_honour_it(tmp_path):
    """A SIGINT before the engine installed its stop handler would kill it unsaved: the launcher's own 'starting'
    status (its PID) does not count; the engine's 'starting' or 'running' does."""
    record = JobRecord(run="r", launched_at=1.0, pid=4242, launcher_pid=os.getpid())
    assert not jobs.ready_for_stop(tmp_path, record), "no status yet"
    write_status(tmp_path, "starting", "launching python -m training")  # written by this (launcher) process
    assert not jobs.ready_for_stop(tmp_path, record)
    write_status(tmp_path, "starting", "lora on 1 process(es)", pid=4242)
    assert jobs.ready_for_stop(tmp_path, record)
    write_status(tmp_path, "running", "step 0 of 9")
    assert jobs.ready_for_stop(tmp_path, record)


def test_a_run_folder_that_cannot_start_fails_its_job_and_does_not_block_the_queue(tmp_path):
    root = tmp_path / "runs"
    (root / "broken").mkdir(parents=True)
    (root / "broken" / "train.log").symlink_to(tmp_path / "elsewhere.log")
    scheduler = Scheduler(root, machine_gpus=[0], command_for=lambda config, world: ["true"])
    scheduler.submit("broken", gpu_count=1, gpu_ids=None, world_size=1)
    scheduler.submit("next", gpu_count=1, gpu_ids=None, world_size=1)
    status = read_status(root / "broken")
    assert status["state"] == "failed" and "train.log is a link" in status["message"]
    assert not (tmp_path / "elsewhere.log").exists()
    assert {r.run: r.assigned for r in scheduler.store.read()}["next"] == (0,), "the next job started"
    wait_until(lambda: not scheduler.processes, "the fake job to end", scheduler=scheduler)
