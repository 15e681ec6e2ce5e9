"""Training throughput: ours against the peers, in one process on one card (issue 9).

Runs, on the same GPU and in the same call: a bf16 matmul peak; the diffusers+peft peer, plain and with every block
compiled (its own script, from --peer-dir); and our engine's training step in the configurations asked for. Prints
one JSON line per run, then a table: img/s, useful TFLOP/s, % of the measured matmul peak, peak memory.

    python bench/bench_speed.py --peer-dir .carry/peers            # everything
    python bench/bench_speed.py --items lora-512,peer-512+compiled   # a selection

Each item runs in its own process (a clean allocator and compile cache); --peer-dir holds the peers' scripts
(../shared/bench, copied into a git-ignored folder because ../shared does not travel to the device).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ours import OUR_CONFIGS, run_ours  # noqa: E402

logger = logging.getLogger("bench_speed")

PEER_CONFIGS = {  # name: (batch, resolution, caption tokens, rank, checkpointing)
    "peer-512": (4, 512, 128, 128, False),
    "peer-1024": (1, 1024, 128, 128, False),
}
PEER_ITEMS = ("peer-512", "peer-1024", "peer-512+compiled", "peer-1024+compiled")


def matmul_peak_tflops(size: int = 8192, repeats: int = 50) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def load_peer(peer_dir: Path):
    path = peer_dir / "peer_diffusers_lora.py"
    spec = importlib.util.spec_from_file_location("peer_diffusers_lora", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_item(item: str, peer_dir: Path, steps: int) -> dict:
    """One measurement in this process: a peer configuration or one of ours."""
    if item == "matmul-peak":
        return {"bf16_matmul_tflops": round(matmul_peak_tflops(), 1)}
    if item in OUR_CONFIGS:
        return run_ours(OUR_CONFIGS[item], steps=steps)
    name, _, variant = item.partition("+")
    peer = load_peer(peer_dir)
    compiled = variant == "compiled"
    return peer.run(*PEER_CONFIGS[name], steps=6, warm=3 if compiled else 2, compile_blocks=compiled)


def run_isolated(item: str, args) -> dict:
    """Run one item in a fresh process: no compiled graphs, allocator state or leaked memory carry over."""
    command = [sys.executable, __file__, "--item", item, "--peer-dir", str(args.peer_dir), "--steps", str(args.steps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.item_timeout)
    except subprocess.TimeoutExpired:
        return {"run": item, "error": f"timeout after {args.item_timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        oom = "OutOfMemoryError" in done.stderr
        return {"run": item, "error": "OOM" if oom else f"exit {done.returncode}: {' | '.join(tail)}"}
    return {"run": item, **json.loads(lines[-1])}


def table(results: list[dict], peak: float) -> str:
    lines = [
        f"bf16 matmul peak: {peak:.1f} TFLOP/s",
        "| run | batch | res | img/s | useful TFLOP/s | % peak | peak GiB |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | | | {r['error']} | | | |")
            continue
        tf = r["tflops_useful"]
        lines.append(
            f"| {r['run']} | {r['batch']} | {r['res']} | {r['img_per_s']:.2f} | {tf:.1f} | {100 * tf / peak:.1f} "
            f"| {r['peak_gib']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-dir", type=Path, default=Path(".carry/peers"))
    parser.add_argument("--items", default=",".join([*PEER_ITEMS, *OUR_CONFIGS]), help="comma-separated")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--item", help=argparse.SUPPRESS)  # internal: run one item in this process
    parser.add_argument("--item-timeout", type=int, default=420)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.item:
        print(json.dumps(run_item(args.item, args.peer_dir, args.steps)), flush=True)
        return 0
    header = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    header["bf16_matmul_tflops"] = run_isolated("matmul-peak", args)["bf16_matmul_tflops"]
    print(json.dumps(header), flush=True)
    results = []
    for item in args.items.split(","):
        results.append(run_isolated(item, args))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            args.out.write_text("\n".join(json.dumps(r) for r in [header, *results]) + "\n")
    print(table(results, header["bf16_matmul_tflops"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
