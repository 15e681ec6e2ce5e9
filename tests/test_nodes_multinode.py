"""The Train node starts a multi-node run as node 0 and prints the commands of the other nodes; here the test plays
the person at the second machine: it runs the printed line for node 1 (a second torchrun on 127.0.0.1, gloo)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time

import pytest
from test_multinode import free_port
from test_nodes_pack import FakeCLIP, FakeVAE, make_images
from test_nodes_support import pack_module
from test_nodes_train import comfy, defaults, tiny_plan  # noqa: F401 (comfy: the fixture)

from training.run import launch
from training.run.events import read_events, read_status
from training.run.multinode import node_command

train_node = pack_module("nodes.train_node")
pack_node = pack_module("nodes.pack_node")
multinode = pack_module("nodes.multinode")


def test_multi_node_run_node_checks_the_address_once_there_is_another_machine():
    (one,) = multinode.MultiNode().machines(nodes=1, master_address="")
    assert one == multinode.Machines(nodes=1, master_address="")
    with pytest.raises(ValueError, match="master_address='': with nodes=2 .* e.g. 10.0.0.5:29500"):
        multinode.MultiNode().machines(nodes=2, master_address="")
    with pytest.raises(ValueError, match="nodes=0 is outside 1..64"):
        multinode.MultiNode().machines(nodes=0, master_address="h:1")
    assert multinode.MultiNode().machines(nodes=2, master_address="[fe80::1]:29500")[0].nodes == 2


def test_node_zero_runs_the_launch_helpers_command_and_prints_the_others(tmp_path):
    machines = multinode.Machines(nodes=3, master_address="10.0.0.5:29500")
    run = multinode.plan_multinode(machines, tmp_path / "config.json", 2, tmp_path / "repo")
    common = dict(config_path=tmp_path / "config.json", nnodes=3, nproc_per_node=2, master="10.0.0.5:29500")
    assert run.this_node == node_command(**common, node_rank=0, python=sys.executable)
    assert len(run.others) == 2
    for rank, line in enumerate(run.others, start=1):
        cd, command = line.split(" && ")
        assert shlex.split(cd) == ["cd", str(tmp_path / "repo")]
        assert shlex.split(command) == node_command(**common, node_rank=rank, python=sys.executable)
    alone = multinode.Machines(nodes=1, master_address="")
    assert multinode.plan_multinode(alone, tmp_path, 2, tmp_path) is None
    assert multinode.plan_multinode(None, tmp_path, 2, tmp_path) is None


def test_the_plan_and_the_machines_must_agree_on_the_machine_count():
    from types import SimpleNamespace

    two_nodes = SimpleNamespace(nodes=2, world_size=16)
    assert multinode.gpus_per_node(two_nodes, multinode.Machines(nodes=2, master_address="h:1")) == 8
    with pytest.raises(ValueError, match=r"the plan is for 2 machines \(16 GPUs\) but Train gets 1: .* nodes=2"):
        multinode.gpus_per_node(two_nodes, None)
    with pytest.raises(ValueError, match="the plan is for 2 machines .* but Train gets 3"):
        multinode.gpus_per_node(two_nodes, multinode.Machines(nodes=3, master_address="h:1"))
    one_node = SimpleNamespace(nodes=1, world_size=4)
    assert multinode.gpus_per_node(one_node, multinode.Machines(nodes=3, master_address="h:1")) == 4
    assert multinode.gpus_per_node(one_node, None) == 4


@pytest.mark.slow
def test_train_node_is_node_zero_and_the_printed_command_joins_it(comfy, monkeypatch):  # noqa: F811
    monkeypatch.setattr(train_node, "STOP_TIMEOUT_SECONDS", 10.0)
    started = []
    real_popen = subprocess.Popen

    def recording_popen(command, **options):
        started.append((command, options.get("shell", False)))
        return real_popen(command, **options)

    monkeypatch.setattr(launch.subprocess, "Popen", recording_popen)
    make_images(comfy.folders["input"] / "photos", count=4)
    pack_settings = defaults(
        pack_node.WIDGETS, image_folder="photos", dataset_name="set", resolution=256, too_small="upscale"
    )
    dataset, _ = pack_node.PackDataset().pack(vae=FakeVAE(), clip=FakeCLIP(), **pack_settings)["result"]
    plan = tiny_plan(comfy)
    settings = defaults(train_node.WIDGETS, run_name="two_nodes", steps=3, save_every=0, caption_dropout=0.0)
    (settings["machines"],) = multinode.MultiNode().machines(nodes=2, master_address=f"127.0.0.1:{free_port()}")
    run_dir = comfy.folders["whetstone_runs"] / "two_nodes"
    outcome: dict = {}

    def node_zero() -> None:
        try:
            outcome["output"] = train_node.Train().train(plan, dataset, "tiny.safetensors", unique_id="7", **settings)
        except Exception as error:  # handed to the test thread, which re-raises it
            outcome["error"] = error

    watchdog = threading.Timer(200.0, lambda: setattr(comfy, "interrupted", True))  # a hung run fails, not hangs
    watchdog.start()
    thread = threading.Thread(target=node_zero)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / multinode.OTHER_NODES_FILE).is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        printed = (run_dir / multinode.OTHER_NODES_FILE).read_text()
        line = next(line for line in printed.splitlines() if not line.startswith("#"))
        cd, command = line.split(" && ")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        second = real_popen(  # the person at the second machine (not ComfyUI: not recorded)
            shlex.split(command), cwd=shlex.split(cd)[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        second_output, _ = second.communicate(timeout=240)
        thread.join(240)
    finally:
        watchdog.cancel()
    assert "error" not in outcome, outcome.get("error")
    assert second.returncode == 0, second_output.decode()[-3000:]
    run, _, report = outcome["output"]["result"]
    assert run.state == "completed" and read_status(run_dir)["state"] == "completed"
    assert [event["step"] for event in read_events(run_dir)] == [1, 2, 3]
    assert "nodes: 2" in report and "other_nodes.txt" in report
    nodes_events = [data for event, data in comfy.events if data.get("kind") == "nodes"]
    assert nodes_events and nodes_events[0]["commands"] == [line]
    commands = [command for command, _ in started]
    assert len(commands) == 1 and not started[0][1]  # ComfyUI started one process, node 0's, with no shell
    assert commands[0][commands[0].index("--node_rank") + 1] == "0" and "--nnodes" in commands[0]
    assert not (run_dir / ".whetstone.lock").exists()  # rank 0 took the folder and let it go at the end
