"""The Train node's multi-node run: ComfyUI's machine is node 0, the other machines are started by a person with the
commands this module prints (ComfyUI never opens a shell or a connection to another machine).

Node 0 runs `training.run.multinode.node_command` for node rank 0 (the launch helper's torchrun line: c10d
rendezvous at ``master_address``, a rendezvous id from the run's config path, no restarts); the commands of nodes
1..M-1 are the same with their node rank, written to ``<run>/other_nodes.txt``, logged, sent to the browser and put
in the node's report. Every node needs the run folder, the shard set and the model at the same paths (a shared file
system) and this repository at the path the command changes into.

The launcher does not keep the run folder's lock for its child: torchrun's rendezvous decides which node's process
is global rank 0 (the nodes are sorted by host name), and that process takes the lock itself, wherever it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from ..training.atomic import write_text_atomic
from ..training.run.multinode import node_command, parse_endpoint
from .validation import Int, SettingRefused, Text, check_all, declare
from .values import MACHINES_TYPE

logger = logging.getLogger(__name__)

OTHER_NODES_FILE = "other_nodes.txt"

WIDGETS = {
    "nodes": Int(
        1,
        1,
        64,
        "Machines in the run, this one included (1: this machine only). With more, this machine is node 0 and the "
        "node prints the command to run on each of the others; they need the run folder, dataset and model at the "
        "same paths (a shared file system).",
    ),
    "master_address": Text(
        "",
        "With nodes > 1: this machine's address and a free port that the other machines can reach, e.g. "
        "10.0.0.5:29500 (torchrun's rendezvous endpoint).",
        256,
    ),
}


@dataclass(frozen=True)
class Machines:
    """What the Multi-Node Run node passes to Train: how many machines and where they meet."""

    nodes: int
    master_address: str


@dataclass(frozen=True)
class MultiNodeRun:
    nodes: int
    master: str
    this_node: list[str]  # node 0's argument list, run by the launcher without a shell
    others: list[str]  # one shell line per other node, for a person to paste there


def check_machines(values: dict) -> Machines:
    """The node's inputs checked: a master address is needed (and must be HOST:PORT) once there is another machine."""
    checked = check_all(WIDGETS, values)
    if checked["nodes"] > 1:
        try:
            parse_endpoint(checked["master_address"])
        except ValueError as error:
            raise SettingRefused(
                f"master_address={checked['master_address']!r}: with nodes={checked['nodes']} give this machine's "
                "address and a free port the other machines reach, e.g. 10.0.0.5:29500"
            ) from error
    return Machines(nodes=checked["nodes"], master_address=checked["master_address"])


def gpus_per_node(plan, machines: Machines | None) -> int:
    """The processes each machine starts: the plan's GPUs per node, once the plan and the machines agree on how many
    machines there are (a plan for one machine is per node: the global batch grows with the machines, logged)."""
    planned = getattr(plan, "nodes", 1)
    machines_count = 1 if machines is None else machines.nodes
    if planned > 1 and machines_count != planned:
        raise SettingRefused(
            f"the plan is for {planned} machines ({plan.world_size} GPUs) but Train gets {machines_count}: wire a "
            f"Multi-Node Run node with nodes={planned} into Train's machines input, or plan for "
            f"{machines_count} machine(s)"
        )
    if planned == 1 and machines_count > 1:
        logger.info(
            "the plan is for one machine: each of the %d machines runs it, so the global batch is %d x the plan's",
            machines_count,
            machines_count,
        )
    return plan.world_size // planned


def plan_multinode(
    machines: Machines | None, config_path: Path, nproc_per_node: int, repo: Path
) -> MultiNodeRun | None:
    """None for a one-machine run; else node 0's command and the others' lines."""
    if machines is None or machines.nodes == 1:
        return None
    common = dict(
        config_path=config_path, nnodes=machines.nodes, nproc_per_node=nproc_per_node,
        master=machines.master_address, python=sys.executable,
    )  # fmt: skip
    others = [
        f"cd {shlex.quote(str(repo))} && {shlex.join(node_command(**common, node_rank=rank))}"
        for rank in range(1, machines.nodes)
    ]
    return MultiNodeRun(
        nodes=machines.nodes, master=machines.master_address, this_node=node_command(**common, node_rank=0),
        others=others,
    )  # fmt: skip


def across_nodes(config, run: MultiNodeRun | None):
    """The run's config for several machines: a one-process plan's parallel strategy 'none' becomes 'ddp' (every
    rank holds what the plan fitted on one GPU; gradients are averaged across all ranks). Logged when changed."""
    if run is None or config.parallel.strategy != "none":
        return config
    logger.info("parallel.strategy 'ddp' instead of the plan's 'none': %d machines train together", run.nodes)
    return dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, strategy="ddp"))


def announce(run: MultiNodeRun, run_dir: Path) -> str:
    """Write, log and return the text telling the user what to run on the other machines."""
    lines = [
        f"# Multi-node run: this ComfyUI machine is node 0 of {run.nodes}; rendezvous at {run.master}.",
        "# Run each line below on its machine (the run folder, dataset and model must be at the same paths there,",
        "# and the Python path is this machine's: change it to that machine's environment if it differs).",
    ]
    for rank, line in enumerate(run.others, start=1):
        lines += [f"# node {rank}:", line]
    text = "\n".join(lines) + "\n"
    write_text_atomic(run_dir / OTHER_NODES_FILE, text)
    logger.warning("multi-node run: start the other nodes with the commands in %s:\n%s", run_dir / OTHER_NODES_FILE,
                   text)  # fmt: skip
    return text


class MultiNode:
    DESCRIPTION = (
        "Makes Train start a run on several machines: this ComfyUI machine is node 0, and Train prints the command "
        "to run on each other machine (in its report, the log and <run>/other_nodes.txt); ComfyUI never connects to "
        "the others itself. Every machine needs the run folder, dataset and model at the same paths."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "machines"
    RETURN_TYPES = (MACHINES_TYPE,)
    RETURN_NAMES = ("machines",)
    OUTPUT_TOOLTIPS = ("For Train's machines input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": declare(WIDGETS)}

    def machines(self, **values):
        return (check_machines(values),)
