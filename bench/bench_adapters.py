"""Each adapter type (LoRA, DoRA, LoKr, LoHa) at 512² bs4 r32 on the full-size Z-Image, in one call on one GPU:
img/s by the honest clock (``bench_ours.run_ours``: wall time of the window, checked against the engine's step
times) and peak memory, next to the planner's predicted peak for the same run. Issue 17.

    python bench/bench_adapters.py --out $OUT            # ~3 min on an H200 (eager, 3 warm-up + 5 timed steps)

Each type runs in its own process (bench_speed.run_isolated: a clean allocator). Writes $OUT/bench_adapters.json;
exits 1 if any type failed (its error is in the JSON and the table).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ours import OUR_CONFIGS  # noqa: E402
from bench_speed import run_isolated  # noqa: E402

ITEMS = ("lora-512-r32", "dora-512-r32", "lokr-512-r32", "loha-512-r32")


def predicted_peak_gib(item: str) -> float:
    """The planner's peak for the benchmark's own run (eager, no checkpointing, the bench's targets)."""
    from training.hardware.memory import GIB, MemoryModel, image_tokens_for, padded

    conf = OUR_CONFIGS[item]
    estimate = MemoryModel().predict_peak(
        conf.mode,
        conf.batch,
        image_tokens_for((conf.resolution, conf.resolution)),
        padded(conf.caption_tokens),
        conf.checkpoint_depth,
        1,
        conf.rank,
        lora_targets=conf.targets,
        compiled=conf.compile,
        adapter=conf.adapter,
    )
    return round(estimate.peak_bytes / GIB, 1)


def table(results: list[dict]) -> str:
    lora = next((r for r in results if r["run"] == "lora-512-r32" and "error" not in r), None)
    lines = ["| adapter | img/s | vs LoRA | peak GiB | planner GiB | s/step |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['run']} | {r['error']} | | | {r['predicted_peak_gib']} | |")
            continue
        speed = f"{r['img_per_s'] / lora['img_per_s']:.2f}x" if lora else "?"
        lines.append(
            f"| {r['run']} | {r['img_per_s']:.2f} | {speed} | {r['peak_gib']:.1f} | {r['predicted_peak_gib']} "
            f"| {r['s_per_step']:.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for bench_adapters.json")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after 3 warm-up steps")
    parser.add_argument("--item-timeout", type=int, default=150)
    parser.add_argument("--items", default=",".join(ITEMS), help="comma-separated (default: the four types)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_adapters needs a CUDA GPU", file=sys.stderr)
        return 1
    args.peer_dir = Path(".")  # run_isolated passes it on; our items never read it
    header = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(header), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for item in args.items.split(","):
        result = {**run_isolated(item, args), "predicted_peak_gib": predicted_peak_gib(item)}
        results.append(result)
        print(json.dumps(result), flush=True)
        (args.out / "bench_adapters.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    print(table(results))
    failed = [r["run"] for r in results if "error" in r]
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
