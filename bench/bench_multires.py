"""A progressive 512 -> 1024 px run of the full-size random-init Z-Image (LoRA, synthetic cached inputs, one GPU):
per-shape step time from the engine's honest clock and peak memory, each against the planner (issue 22).

The planner plans both shapes (``training.hardware.shape_plan``: the 1024 px plan fixes checkpoint depth and the
global batch, 512 px gets the largest micro-batch that fits and divides it); the run is a real ``Trainer`` built from
that ``TrainConfig`` with ``resolutions.schedule = progressive`` (512 px for the first ``--switch`` of the steps). Per
resolution it reports the step time over the phase after its first (compiling / warm-up) step, checked against the
wall clock (``training.engine.timing.window_rate``, 3 %), and the phase's ``max_memory_allocated`` (peak statistics
reset when the resolution changes) against the plan's predicted peak. Exit 1 when a peak is more than
``--tolerance`` (3 %) off its prediction; a timing mismatch raises.

    python bench/bench_multires.py                 # on the GPU; JSON to $OUT/bench_multires.json (~2 min, H200)
    python bench/bench_multires.py --dry-run       # anywhere: the plan and the config, no training
    python bench/bench_multires.py --smoke         # CPU: the tiny model at 64 -> 128 px, the script's mechanics
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.engine.config import TrainConfig  # noqa: E402
from training.engine.timing import window_rate  # noqa: E402
from training.hardware.discovery import discover  # noqa: E402
from training.hardware.memory import GIB, MemoryModel  # noqa: E402
from training.hardware.request import PlanRequest  # noqa: E402
from training.hardware.shape_plan import plan_shapes  # noqa: E402
from training.hardware.tiers import load_tiers, simulated_profile  # noqa: E402
from training.model.config import PRESETS  # noqa: E402

logger = logging.getLogger("bench_multires")
CAPTION_TOKENS = 128


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps in all (default 4 at 512, 6 at 1024)")
    parser.add_argument("--switch", type=float, default=0.4, help="fraction of the steps at the low resolution")
    parser.add_argument("--low", type=int, default=512)
    parser.add_argument("--high", type=int, default=1024)
    parser.add_argument("--global-batch", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--compile", action="store_true", help="per-block torch.compile (slower start)")
    parser.add_argument("--tolerance", type=float, default=0.03, help="allowed |measured / predicted - 1| of peaks")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default $OUT/bench_multires.json)")
    parser.add_argument("--dry-run", action="store_true", help="plan and print the config only (no GPU needed)")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, 64 -> 128 px, no memory check")
    args = parser.parse_args(argv)
    if args.smoke:
        args.low, args.high = 64, 128
    if args.steps < 4 or not 0 < args.switch < 1:
        parser.error("--steps must be >= 4 and --switch in (0, 1): each phase needs a warm-up and a timed step")
    return args


def plan(args):
    """(shape plan, profile) for the low and high square shapes on this GPU (or the 1x80GB tier off-GPU)."""
    model = PRESETS["tiny" if args.smoke else "z-image"]
    profile = discover() if torch.cuda.is_available() else simulated_profile(load_tiers()["1x80GB"])
    request = PlanRequest(
        mode="lora",
        resolution=args.high,
        caption_tokens=CAPTION_TOKENS,
        target_global_batch=args.global_batch,
        compile=args.compile,
        model=model,
    )
    shapes = {args.low: [(args.low, args.low)], args.high: [(args.high, args.high)]}
    return plan_shapes(request, profile, shapes, MemoryModel(model=model)), profile


def train_config(args, shape_plan, run_dir: str) -> TrainConfig:
    section = shape_plan.section() | {
        "schedule": "progressive",
        "stages": [[args.low, args.switch], [args.high, 1.0]],
        "shift_rule": "sqrt_area",
        "shift_reference": args.high,
    }
    run = {"output_dir": run_dir, "steps": args.steps, "save_state": False, "seed": 0}
    data = {"synthetic": True, "resolution": args.high, "caption_tokens": CAPTION_TOKENS}
    model = {"preset": "tiny", "dtype": "fp32"} if args.smoke else {}
    config = TrainConfig.from_plan(shape_plan.base, run=run, data=data, resolutions=section)
    if model:
        config = TrainConfig.from_dict(config.to_dict() | {"model": config.to_dict()["model"] | model})
    return config


def run_phases(config: TrainConfig, device: torch.device) -> dict[int, dict]:
    """Train every step through a real Trainer; per resolution its step events and peak allocated bytes."""
    from training.engine.distributed import init_distributed, shutdown_distributed
    from training.engine.trainer import Trainer
    from training.run.events import RunLog

    dist_info = init_distributed(timeout_s=600)
    log = RunLog(config.run.output_dir, rank=0)
    phases: dict[int, dict] = {}
    try:
        started = time.perf_counter()
        trainer = Trainer.build(config, dist_info, log)
        logger.info("built the trainer in %.1f s", time.perf_counter() - started)
        while trainer.step < config.run.steps:
            resolution = trainer.shapes.at(trainer.step).resolution
            if resolution not in phases:  # a new phase: its own peak from here
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                phases[resolution] = {"events": [], "peak_bytes": 0}
            metrics = trainer.train_step()
            metrics.pop("stop_requested")
            trainer.step += 1
            event = {"time": time.time(), "step": trainer.step, **metrics}
            log.step(event)
            phases[resolution]["events"].append(event)
            if device.type == "cuda":
                phases[resolution]["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            logger.info("step %d at %d px: %.3f s, loss %.4f", trainer.step, resolution, event["step_s"], event["loss"])
    finally:
        log.close()
        shutdown_distributed()
    return phases


def report(args, shape_plan, phases: dict[int, dict], device: torch.device) -> tuple[dict, bool]:
    ok = True
    rows = {}
    for resolution, phase in phases.items():
        micro, accum, predicted = shape_plan.resolution(resolution)
        rate = window_rate(phase["events"], warmup=1)  # raises TimingMismatch when the clock is not honest
        row = {
            "shape": f"{resolution}x{resolution}",
            "steps": len(phase["events"]),
            "micro_batch": micro,
            "grad_accum": accum,
            "first_step_s": phase["events"][0]["step_s"],
            "median_step_s": rate.median_step_s,
            "img_per_s": rate.img_per_s,
            "clock_disagreement": rate.disagreement,
            "predicted_peak_gib": predicted / GIB,
            "loss_last": phase["events"][-1]["loss"],
        }
        if device.type == "cuda":
            error = phase["peak_bytes"] / predicted - 1
            row |= {"measured_peak_gib": phase["peak_bytes"] / GIB, "peak_error": error}
            ok &= abs(error) <= args.tolerance
        rows[str(resolution)] = row
    result = {
        "bench": "multires",
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "steps": args.steps,
        "switch": args.switch,
        "global_batch": shape_plan.base.global_batch,
        "checkpoint_depth": shape_plan.base.checkpoint_depth,
        "compile": shape_plan.base.compile,
        "attention_backend": shape_plan.base.attention_backend,
        "budget_gib": shape_plan.base.budget_bytes / GIB,
        "tolerance": args.tolerance,
        "within_tolerance": ok,
        "by_resolution": rows,
    }
    return result, ok


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shape_plan, profile = plan(args)
    with tempfile.TemporaryDirectory(prefix="whetstone-bench-multires-") as run_dir:
        config = train_config(args, shape_plan, run_dir)
        if args.dry_run:
            print(json.dumps({"plan": shape_plan.to_dict(), "config": config.to_dict()}, indent=1, default=str))
            return 0
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        if device.type != "cuda" and not args.smoke:
            raise SystemExit("bench_multires needs a CUDA GPU (or --smoke / --dry-run on the CPU)")
        phases = run_phases(config, device)
    result, ok = report(args, shape_plan, phases, device)
    out = args.out or Path(os.environ.get("OUT", ".")) / "bench_multires.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    for resolution, row in result["by_resolution"].items():
        measured = f"{row['measured_peak_gib']:.2f} GiB ({row['peak_error']:+.1%})" if "peak_error" in row else "n/a"
        print(
            f"{resolution:>5} px: micro {row['micro_batch']} x {row['grad_accum']}, median step "
            f"{row['median_step_s']:.3f} s ({row['img_per_s']:.2f} img/s), peak {measured} vs predicted "
            f"{row['predicted_peak_gib']:.2f} GiB"
        )
    if not ok:
        print(f"FAIL: a peak is more than {args.tolerance:.0%} off the planner's prediction", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
