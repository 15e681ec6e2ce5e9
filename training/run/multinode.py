"""``python -m training launch``: the torchrun command of every node of a multi-node run, and (``--run``) this node's.

Every node runs the same ``torchrun`` command but its ``--node_rank``; the nodes meet through torchrun's c10d
rendezvous at ``--master HOST:PORT`` (a port of one of the nodes that the others can reach), under a rendezvous id
derived from the config path so two jobs sharing an endpoint do not join each other. The printed lines are
shell-quoted for a person to paste on each machine; ``--run`` never goes through a shell: it runs this node's argument
list. It does not take the run folder's lock: torchrun decides at the rendezvous which node holds global rank 0, and
that rank takes the lock itself (the folder must be one shared folder; see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shlex
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_PORT = 65535


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) → (host, port); a ValueError names --master and the fix."""
    host, sep, port_text = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= MAX_PORT:
        raise ValueError(
            f"--master {text!r} is not HOST:PORT: give the address of the first node and a free port on it, "
            "e.g. --master node0.cluster:29500"
        )
    if any(char.isspace() for char in host) or host.startswith("-"):
        raise ValueError(f"--master {text!r}: {host!r} is not a host name or address")
    return host, int(port_text)


def rendezvous_id(config_path: Path) -> str:
    """The same id on every node for one config path (as written on the command line), another for another run."""
    return "whetstone-" + hashlib.sha256(str(config_path).encode("utf-8")).hexdigest()[:12]


def node_command(
    *, config_path: Path, nnodes: int, nproc_per_node: int, master: str, node_rank: int, python: str
) -> list[str]:
    """The argument list that starts node ``node_rank`` of the run (torchrun, then the engine's ``train``)."""
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"--nnodes {nnodes} and --nproc-per-node {nproc_per_node} must both be at least 1")
    if not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} is outside 0..{nnodes - 1} (--nnodes {nnodes})")
    host, port = parse_endpoint(master)
    endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    torchrun = [python, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank)]
    torchrun += ["--nproc_per_node", str(nproc_per_node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint]
    torchrun += ["--rdzv_id", rendezvous_id(config_path), "--max-restarts", "0"]
    return [*torchrun, "-m", "training", "train", "--config", str(config_path)]


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "launch",
        help="print (or run) the torchrun command of every node of a multi-node run",
        description=(
            "Print the torchrun command each node runs (one line per node, shell-quoted for display), or with --run "
            "run this node's command (--node-rank R) as an argument list, without a shell. See docs/scaling.md."
        ),
    )
    parser.add_argument("--nnodes", required=True, type=int, metavar="M", help="machines in the run")
    parser.add_argument("--nproc-per-node", required=True, type=int, metavar="N", help="processes (GPUs) each")
    parser.add_argument(
        "--master", required=True, metavar="HOST:PORT", help="the rendezvous: a node's address the others reach"
    )
    parser.add_argument("--config", required=True, type=Path, help="the run's config.json, at this path on every node")
    parser.add_argument("--run", action="store_true", help="run this node's command instead of printing them all")
    parser.add_argument("--node-rank", type=int, metavar="R", help="this node's rank (with --run)")
    parser.add_argument(
        "--python", default=sys.executable, help="the Python of the training environment (default: %(default)s)"
    )
    parser.set_defaults(func=launch_command)
    return parser


def launch_command(args: argparse.Namespace) -> int:
    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise ValueError(f"--nnodes {args.nnodes} and --nproc-per-node {args.nproc_per_node} must both be at least 1")
    common = dict(config_path=args.config, nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, master=args.master)
    if not args.run:
        if args.node_rank is not None:
            raise ValueError("--node-rank is for --run: without it every node's command is printed")
        for rank in range(args.nnodes):
            print(shlex.join(node_command(**common, node_rank=rank, python=args.python)))
        return 0
    if args.node_rank is None:
        raise ValueError("--run needs --node-rank R: this machine's place among the --nnodes nodes (0 on the first)")
    command = node_command(**common, node_rank=args.node_rank, python=args.python)
    if not args.config.is_file():
        raise ValueError(f"--config {args.config} is not a file on this node: every node needs the run's config")
    return run_node(command)


def run_node(command: list[str]) -> int:
    """Run one node's torchrun to its end in the foreground; Ctrl+C reaches torchrun (same process group), which
    forwards it to its workers once: they save and stop. Returns torchrun's exit code."""
    logger.info("starting this node: %s", shlex.join(command))
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)  # noqa: S603 (an argument list, no shell)
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:
            logger.warning("Ctrl+C: torchrun got it too and is stopping its workers; waiting for it")
    (logger.info if code == 0 else logger.error)("this node's torchrun exited with code %d", code)
    return code
