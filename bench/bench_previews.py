"""Preview overhead: the share of a training run's time that previews take (issue 16), on the full-size random-init
Z-Image at 512² on one GPU, measured from a real run's events with the engine's honest clock.

    python bench/bench_previews.py                      # LoRA r128, batch 4, 512², compiled; Turbo-style previews
    python bench/bench_previews.py --sampler-steps 28 --cfg 4   # Base-style previews (two forwards per step)

One run of ``run_training`` on synthetic cached inputs with ``preview`` set: previews of ``--prompts`` prompts at
``--size``² before the first step, every ``--every`` steps and at the end. The step clock restarts after each
preview (`training.engine.trainer.Trainer._preview`), so step events time training only and each preview event
times itself; the check here is that training steps + previews add up to the run's wall clock between the first and
the last step (within 5%), else it fails. Reported: seconds per preview set (the first one separately: it compiles
the eval shapes), training seconds per step, the measured share of the window, and the share a run would pay at
``every`` = 50, 100, 250. Prints one JSON object and writes it to $OUT/bench_previews.json when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ours import OUR_CONFIGS, train_config  # noqa: E402

from training.engine.config import ModelSection, PreviewSection  # noqa: E402
from training.engine.preview import read_preview_events, save_prompt_features  # noqa: E402
from training.engine.trainer import run_training  # noqa: E402
from training.run.events import read_events  # noqa: E402

logger = logging.getLogger("bench_previews")
WALL_TOLERANCE = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lora-512", choices=sorted(OUR_CONFIGS), help="bench_ours configuration")
    parser.add_argument("--steps", type=int, default=24, help="training steps (default: %(default)s)")
    parser.add_argument("--every", type=int, default=8, help="preview every N steps (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=2, help="preview prompts (default: %(default)s)")
    parser.add_argument("--sampler-steps", type=int, default=8, help="sampler steps (default: %(default)s)")
    parser.add_argument("--cfg", type=float, default=1.0, help="ComfyUI cfg (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="preview width and height (default: %(default)s)")
    parser.add_argument("--eager", action="store_true", help="no torch.compile (the config's default is compiled)")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: the tiny model at 64²")
    return parser.parse_args(argv)


def write_prompts(path: Path, count: int, dim: int) -> None:
    generator = torch.Generator().manual_seed(0)
    positives = [torch.randn(48 + 8 * i, dim, generator=generator) for i in range(count)]
    save_prompt_features(
        path, [f"prompt {i}" for i in range(count)], positives, torch.randn(8, dim, generator=generator)
    )


def measure(args: argparse.Namespace) -> dict:
    conf = OUR_CONFIGS[args.config]
    if args.eager or args.smoke:
        conf = dataclasses.replace(conf, compile=False)
    if args.smoke:
        conf = dataclasses.replace(conf, batch=1, resolution=64, rank=4, caption_tokens=16)
    with tempfile.TemporaryDirectory(prefix="whetstone-bench-previews-") as run_dir:
        prompts = Path(run_dir) / "prompts.safetensors"
        write_prompts(prompts, args.prompts, 32 if args.smoke else 2560)
        config = train_config(conf, run_dir, args.steps)
        if args.smoke:
            config.model = ModelSection(preset="tiny", dtype="fp32")
        config.preview = PreviewSection(
            features=str(prompts), every=args.every, steps=args.sampler_steps, cfg=args.cfg,
            width=args.size, height=args.size,
        )  # fmt: skip
        started = time.time()
        if run_training(config) != 0:
            raise RuntimeError(f"run_training failed; see {run_dir}")
        total_wall_s = time.time() - started
        steps = [e for e in read_events(run_dir) if "step_s" in e]
        previews = read_preview_events(run_dir)
    return summarize(args, conf, steps, previews, total_wall_s)


def summarize(args, conf, steps: list[dict], previews: list[dict], total_wall_s: float) -> dict:
    if len(steps) != args.steps or len(previews) < 3:
        raise RuntimeError(f"expected {args.steps} step events and >= 3 previews, got {len(steps)} and {len(previews)}")
    first, later = previews[0], [p for p in previews[1:] if p["step"] > 1]
    # the window: from the end of step 1 (compiled, warm) to the end of the last step
    window_steps = [e for e in steps if e["step"] > 1]
    in_window = [p for p in previews if 1 <= p["step"] < steps[-1]["step"]]  # run after steps inside the window
    train_s = sum(e["step_s"] for e in window_steps)
    preview_s = sum(p["seconds"] for p in in_window)
    wall_s = steps[-1]["time"] - next(e for e in steps if e["step"] == 1)["time"]
    disagreement = abs((train_s + preview_s) / wall_s - 1)
    if disagreement > WALL_TOLERANCE:
        raise RuntimeError(
            f"steps ({train_s:.2f} s) + previews ({preview_s:.2f} s) differ from the wall clock ({wall_s:.2f} s) by "
            f"{disagreement:.1%}: the clocks do not measure what a user waits for"
        )
    step_s = train_s / len(window_steps)
    per_set_s = sum(p["seconds"] for p in later) / len(later)
    return {
        "config": args.config,
        "compile": conf.compile,
        "batch": conf.batch,
        "resolution": conf.resolution,
        "preview": {"prompts": args.prompts, "sampler_steps": args.sampler_steps, "cfg": args.cfg, "size": args.size},
        "forwards_per_set": args.prompts * args.sampler_steps * (1 if abs(args.cfg - 1) < 1e-9 else 2),
        "train_s_per_step": round(step_s, 4),
        "img_per_s": round(conf.batch / step_s, 3),
        "first_preview_s": round(first["seconds"], 2),
        "preview_s_per_set": round(per_set_s, 3),
        "preview_steps_equivalent": round(per_set_s / step_s, 2),
        "measured_share": round(preview_s / wall_s, 4),
        "measured_every": args.every,
        "share_at_every": {n: round(per_set_s / (per_set_s + n * step_s), 4) for n in (50, 100, 250)},
        "wall_check": round(disagreement, 4),
        "total_wall_s": round(total_wall_s, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
        "peak_gib": round(max(e["peak_mem_gb"] for e in steps), 1),
    }


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench_previews needs a CUDA GPU (the full-size model at 512²)")
    result = measure(args)
    print(json.dumps(result, indent=1))
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_previews.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
