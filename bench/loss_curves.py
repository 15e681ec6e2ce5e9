"""Numerics of the fast paths: the loss curve of each optimised variant against the plain (eager bf16) path.

Every variant trains the same full-size random-init model from the same seed on the same synthetic cached inputs
(each sample's data, σ and noise are functions of the seed and its index), through ``python -m training train``.
Printed per variant: the wall-clock step time (checked against the engine's timer), the largest and the mean relative
difference of the smoothed loss curve from the reference curve (the first variant's, or ``--reference``'s), and the
same for the raw per-step losses.

    python bench/loss_curves.py --steps 200 --variants plain,compiled,fp8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ours import OUR_CONFIGS, train_config  # noqa: E402

from training.engine.report import smooth  # noqa: E402
from training.engine.timing import window_rate  # noqa: E402
from training.run.events import read_events  # noqa: E402

VARIANTS = {
    "plain": dataclasses.replace(OUR_CONFIGS["lora-512"], compile=False),
    "compiled": OUR_CONFIGS["lora-512"],
    "compiled-peft": OUR_CONFIGS["lora-512-peft"],  # peft's separate adapter GEMMs (before lora_concat)
    "fp8": OUR_CONFIGS["fp8-512"],
    "qlora": OUR_CONFIGS["qlora-512"],
    "qlora-peft": OUR_CONFIGS["qlora-512-peft"],  # peft's separate adapter GEMMs over the NF4 base
}
SMOOTHING = 0.9  # EMA factor of the compared curves


def train(variant: str, steps: int, root: Path, timeout: int) -> list[dict]:
    run_dir = root / variant
    config_path = root / f"{variant}.json"
    train_config(VARIANTS[variant], str(run_dir), steps).save(config_path)
    command = [sys.executable, str(Path(__file__).resolve()), "--train-variant", variant, str(config_path)]
    subprocess.run(command, check=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1])
    return [e for e in read_events(run_dir) if "loss" in e]


def compare(reference: list[float], other: list[float]) -> dict:
    ref_smooth, other_smooth = smooth(reference, SMOOTHING), smooth(other, SMOOTHING)
    smooth_rel = [abs(a - b) / abs(b) for a, b in zip(other_smooth, ref_smooth, strict=True)]
    raw_rel = [abs(a - b) / abs(b) for a, b in zip(other, reference, strict=True)]
    return {
        "smoothed_max_rel": max(smooth_rel),
        "smoothed_mean_rel": statistics.fmean(smooth_rel),
        "raw_mean_rel": statistics.fmean(raw_rel),
        "first_loss": other[0],
        "last_smoothed": other_smooth[-1],
    }


def train_variant(variant: str, config_path: str) -> int:
    """The training process of one variant: its levers set (`bench_ours.apply_levers`), then ``training train``."""
    from bench_ours import apply_levers

    from training.__main__ import main as training_main

    apply_levers(VARIANTS[variant])
    return training_main(["--log-level", "WARNING", "train", "--config", config_path])


def main() -> int:
    if sys.argv[1:2] == ["--train-variant"]:
        return train_variant(*sys.argv[2:4])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variants", default="plain,compiled,fp8", help=f"from {sorted(VARIANTS)}; first = reference")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per variant")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--reference",
        default=None,
        metavar="FILE:VARIANT",
        help="compare against VARIANT's curve in an earlier --out FILE (the runs are deterministic) instead of the "
        "first variant trained here: a device call then trains only the variants under test",
    )
    args = parser.parse_args()
    names = args.variants.split(",")
    reference = load_reference(args.reference, args.steps) if args.reference else None
    curves, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="whetstone-curves-") as root:
        for name in names:
            events = train(name, args.steps, Path(root), args.timeout)
            curves[name] = [e["loss"] for e in events]
            window = window_rate(events, warmup=3)  # raises when the step timer disagrees with the wall clock
            step_s = window.wall_s / window.steps
            row = {"variant": name, "steps": len(events), "wall_step_s": round(step_s, 4)}
            row |= compare(reference or curves[names[0]], curves[name])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every variant: a call that runs out of time keeps the variants it finished
                args.out.write_text(json.dumps({"rows": rows, "curves": curves}) + "\n")
    print_table(rows, args.reference or names[0])
    return 0


def load_reference(spec: str, steps: int) -> list[float]:
    path, _, variant = spec.rpartition(":")
    curves = json.loads(Path(path).read_text())["curves"]
    if variant not in curves or len(curves[variant]) != steps:
        raise SystemExit(f"--reference {spec}: {path} has no {steps}-step curve {variant!r} (it has {sorted(curves)})")
    return curves[variant]


def print_table(rows: list[dict], reference: str) -> None:
    print(f"Δ: relative to the curve of {reference}; speed: against the first row")
    print("| variant | steps | wall s/step | smoothed max rel Δ | smoothed mean rel Δ | raw mean rel Δ | speed |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        speed = rows[0]["wall_step_s"] / row["wall_step_s"]
        print(
            f"| {row['variant']} | {row['steps']} | {row['wall_step_s']:.3f} | {row['smoothed_max_rel']:.4f} "
            f"| {row['smoothed_mean_rel']:.4f} | {row['raw_mean_rel']:.4f} | {speed:.2f}x |"
        )


if __name__ == "__main__":
    sys.exit(main())
