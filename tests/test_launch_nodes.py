"""``python -m training launch``: the per-node torchrun commands it prints, and the mistakes it refuses (exit 2).
(That ``--run`` starts a node that trains is tested in test_multinode.py.)"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from training.run.multinode import node_command, parse_endpoint, rendezvous_id

LAUNCH = [sys.executable, "-m", "training", "launch"]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=60)


def test_prints_one_torchrun_command_per_node():
    config = "runs/my run/config.json"  # a space: the display quotes it, the argument list keeps it whole
    args = ["--nnodes", "3", "--nproc-per-node", "8", "--master", "node0.cluster:29500", "--config", config]
    result = launch(*args, "--python", "/opt/venv/bin/python")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    rdzv = rendezvous_id(Path(config))
    for rank, line in enumerate(lines):
        assert shlex.split(line) == [
            "/opt/venv/bin/python", "-m", "torch.distributed.run", "--nnodes", "3", "--node_rank", str(rank),
            "--nproc_per_node", "8", "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0.cluster:29500",
            "--rdzv_id", rdzv, "--max-restarts", "0", "-m", "training", "train", "--config", config,
        ]  # fmt: skip


def test_the_rendezvous_id_tells_runs_apart_and_is_the_same_on_every_node():
    assert rendezvous_id(Path("a/config.json")) == rendezvous_id(Path("a/config.json"))
    assert rendezvous_id(Path("a/config.json")) != rendezvous_id(Path("b/config.json"))


def test_ipv6_master_is_bracketed():
    assert parse_endpoint("[fe80::1]:29500") == ("fe80::1", 29500)
    command = node_command(
        config_path=Path("c.json"), nnodes=2, nproc_per_node=1, master="[fe80::1]:29500",
        node_rank=1, python="python",
    )  # fmt: skip
    assert command[command.index("--rdzv_endpoint") + 1] == "[fe80::1]:29500"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--master", "node0"], "--master 'node0' is not HOST:PORT"),
        (["--master", "node0:0"], "is not HOST:PORT"),
        (["--master", "node0:70000"], "is not HOST:PORT"),
        (["--master=-x:29500"], "is not a host name"),
        (["--master", "n:1", "--node-rank", "1"], "--node-rank is for --run"),
        (["--master", "n:1", "--run"], "--run needs --node-rank"),
        (["--master", "n:1", "--run", "--node-rank", "2"], "--node-rank 2 is outside 0..1"),
        (["--master", "n:1", "--run", "--node-rank", "0"], "is not a file on this node"),
    ],
)
def test_mistakes_exit_2_naming_the_flag(tmp_path, args, named):
    result = launch("--nnodes", "2", "--nproc-per-node", "1", "--config", str(tmp_path / "missing.json"), *args)
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr


def test_counts_below_one_are_refused():
    result = launch("--nnodes", "0", "--nproc-per-node", "1", "--master", "n:1", "--config", "c.json")
    assert result.returncode == 2 and "--nnodes" in result.stderr
