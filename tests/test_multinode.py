"""Training across "nodes": two torchrun invocations on 127.0.0.1 (gloo, one process each) meeting through the c10d
rendezvous, as two machines would (``--nnodes 2 --node_rank 0/1 --rdzv_backend c10d --rdzv_endpoint HOST:PORT``).

* two nodes give the loss curve of one process with the same global batch (relative 1e-5, as for 2 local processes:
  only the order of float32 reductions differs);
* one node killed (SIGKILL to its torchrun agent and its worker at once) mid-run: the other node ends too, within
  60 s, the last checkpoint stays valid, and a rerun on two nodes resumes it to the uninterrupted curve; the steps
  the killed attempt trained after its checkpoint come again bit for bit.

Both nodes share one run folder (one machine); rank 0 alone holds its lock and writes events and status.
A rank that does not see the folder rank 0 holds (per-node disks) makes every rank refuse to start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_engine_runs import REPO, assert_same_curve, tiny_config, train_in_process, write_config

from training.run.events import read_events, read_status
from training.run.multinode import rendezvous_id

NODE_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_command(config_path: Path, node_rank: int, port: int, *, via_launch: bool = False) -> list[str]:
    """Node ``node_rank``'s torchrun, written out; or ``python -m training launch --run`` (which must start the
    same: the two kinds of node meet at one rendezvous)."""
    if via_launch:
        launch = [sys.executable, "-m", "training", "launch", "--nnodes", "2", "--nproc-per-node", "1"]
        return [*launch, "--master", f"127.0.0.1:{port}", "--config", str(config_path), "--run", "--node-rank", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank)]
    rendezvous = ["--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
    rendezvous += ["--rdzv_id", rendezvous_id(config_path), "--max-restarts", "0"]
    return [*torchrun, *rendezvous, "-m", "training", "train", "--config", str(config_path)]


def start_nodes(config: dict, logs: Path, *, second_via_launch: bool = False) -> list[subprocess.Popen]:
    path, port = write_config(config), free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    nodes = []
    for node_rank in (0, 1):
        with open(logs / f"node{node_rank}.log", "ab") as log:
            nodes.append(
                subprocess.Popen(
                    node_command(path, node_rank, port, via_launch=second_via_launch and node_rank == 1),
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # apart from pytest; `kill_node` ends it and its workers
                )
            )
    return nodes


def wait_nodes(nodes: list[subprocess.Popen], logs: Path, timeout_s: float = NODE_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout_s
    try:
        return [node.wait(timeout=max(1.0, deadline - time.monotonic())) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)
                node.wait()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts each worker in a session of its own, so a node's process
    group does not hold its workers)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a whole node at once, as a machine failing: its torchrun agent and every worker it started."""
    for pid in [node.pid, *descendants(node.pid)]:
        os.kill(pid, signal.SIGKILL)


def log_tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))


def train_two_nodes(config: dict, logs: Path, *, second_via_launch: bool = False) -> list[dict]:
    codes = wait_nodes(start_nodes(config, logs, second_via_launch=second_via_launch), logs)
    assert codes == [0, 0], log_tails(logs)
    return read_events(config["run"]["output_dir"])


def test_two_nodes_match_one_process(tmp_path):
    """One process with micro-batch 4 vs two nodes with micro-batch 2 each: the same 8 samples per step. Node 1 is
    started by ``python -m training launch --run``."""
    single = train_in_process(tiny_config(tmp_path / "one", micro_batch=4))
    logs = tmp_path / "logs"
    double = train_two_nodes(tiny_config(tmp_path / "two", micro_batch=2), logs, second_via_launch=True)
    assert_same_curve(double, single, rel=1e-5)
    assert read_status(tmp_path / "two")["state"] == "completed"
    assert (tmp_path / "two" / "lora.safetensors").is_file()
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert not (tmp_path / "two" / ".whetstone.lock").exists()  # rank 0 released the folder it held
    assert "starting this node: " in (logs / "node1.log").read_text()


def _wait_for(condition, nodes: list[subprocess.Popen], logs: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert all(node.poll() is None for node in nodes), "a node ended early\n" + log_tails(logs)
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s\n" + log_tails(logs)
        time.sleep(0.02)


def test_killing_one_node_ends_the_job_and_a_rerun_resumes_exactly(tmp_path):
    steps = 8
    constant_lr = {"lr": 1e-3}
    reference = train_in_process(
        {**tiny_config(tmp_path / "reference", micro_batch=4, steps=steps), "optim": constant_lr}
    )
    # Configured far longer than it will run (constant LR: the length does not change the curve), so it is still
    # training when node 1 is killed; the rerun is given the reference's length.
    long = {**tiny_config(tmp_path / "run", micro_batch=2, steps=10_000, save_every=2), "optim": constant_lr}
    logs = tmp_path / "logs"
    nodes = start_nodes(long, logs)
    checkpoint = tmp_path / "run/checkpoints/step-000002/checkpoint.json"
    _wait_for(lambda: checkpoint.is_file() and len(read_events(tmp_path / "run")) >= 3, nodes, logs)

    workers = descendants(nodes[1].pid)
    assert workers, "node 1 has no worker to kill"
    kill_node(nodes[1])
    killed_at = time.monotonic()
    codes = wait_nodes(nodes, logs, timeout_s=60)
    for pid in workers:  # node 1's worker went with its node (not left training without it)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    ended_after_s = time.monotonic() - killed_at
    print(f"the job ended {ended_after_s:.1f} s after node 1 was killed")  # the figure docs/scaling.md quotes
    assert ended_after_s < 60 and codes[0] != 0, (codes, log_tails(logs))
    assert read_status(tmp_path / "run")["state"] == "failed"
    first_attempt = {e["step"]: e for e in read_events(tmp_path / "run")}
    saved = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir() if (p / "checkpoint.json").is_file())
    last_saved = int(saved[-1].removeprefix("step-"))
    assert checkpoint.is_file() and last_saved >= 2

    resumed = train_two_nodes({**long, "run": {**long["run"], "steps": steps}}, logs)
    assert read_status(tmp_path / "run")["state"] == "completed"
    assert_same_curve(resumed, reference, rel=1e-5)
    again = [step for step in first_attempt if step > last_saved]  # trained before the kill, lost, trained again
    assert_same_curve([resumed[s - 1] for s in again], [first_attempt[s] for s in again], rel=0)
    assert "resuming at step" in (logs / "node0.log").read_text() + (logs / "node1.log").read_text()


def test_a_rank_that_does_not_see_rank_0s_run_folder_refuses_on_every_rank(tmp_path):
    """Per-node disks: rank 1's run folder (same path, another disk: here another folder) lacks rank 0's lock file.
    ``agree`` stands for the all-reduce: it returns what the other rank would add to this rank's answer."""
    from training.lock import FolderLock
    from training.run.session import run_session

    shared, other_disk = tmp_path / "shared", tmp_path / "node1-disk"
    other_disk.mkdir()
    with FolderLock(shared, "training"):  # rank 0 holds the shared folder
        with run_session(shared, rank=1, world_size=2, agree=lambda ok: ok) as how:
            assert how == "other rank"  # the folder rank 0 holds: fine
        with pytest.raises(ValueError, match="is not one shared folder"):
            with run_session(other_disk, rank=1, world_size=2, agree=lambda ok: ok):
                pass
    answers = iter([True, False])  # rank 0: the folder is free, then rank 1 does not see it
    with pytest.raises(ValueError, match="run.output_dir .* is not one shared folder"):
        with run_session(shared, rank=0, world_size=2, agree=lambda ok: ok and next(answers)):
            pass
    assert not (shared / ".whetstone.lock").exists()  # rank 0 let the folder go
