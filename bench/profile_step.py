"""Where a training step's GPU time goes: our engine's step under torch.profiler, kernels grouped by kind.

    python bench/profile_step.py --config lora-512          # a configuration of bench_ours.py
    python bench/profile_step.py --config lora-1024 --top 30

Prints the share of CUDA time per group (matmul, attention, fused elementwise, optimizer, copies, ...) and the
top kernels; writes a Chrome trace when --trace is given; --gaps adds where the GPU idles and who made it wait.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trace_gaps  # noqa: E402
from bench_ours import OUR_CONFIGS, train_config  # noqa: E402

from training.engine.distributed import init_distributed, shutdown_distributed  # noqa: E402
from training.engine.trainer import Trainer  # noqa: E402
from training.run.events import RunLog  # noqa: E402

GROUPS = (  # first match wins
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "wgmma", "matmul", "triton_tem")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast", ("copy", "memcpy", "memset", "fill", "cat")),
    ("fused elementwise (triton)", ("triton",)),
    ("reduction/norm", ("reduce", "norm", "softmax")),
)


def group_of(name: str) -> str:
    lower = name.lower()
    return next((group for group, keys in GROUPS if any(k in lower for k in keys)), "other")


def profile(config_name: str, warmup: int, steps: int, trace: Path | None):
    conf = OUR_CONFIGS[config_name]
    with tempfile.TemporaryDirectory(prefix="whetstone-profile-") as run_dir:
        config = train_config(conf, run_dir, warmup + steps)
        dist_info = init_distributed(timeout_s=600)
        log = RunLog(run_dir, rank=0)
        try:
            trainer = Trainer.build(config, dist_info, log)
            for _ in range(warmup):
                trainer.train_step()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(steps):
                    metrics = trainer.train_step()
            torch.cuda.synchronize()
        finally:
            log.close()
            shutdown_distributed()
    if trace:
        prof.export_chrome_trace(str(trace))
    return prof, metrics


def report(prof, metrics: dict, steps: int, top: int) -> str:
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    by_group: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_group[group_of(e.key)] += e.self_device_time_total
    lines = [f"step {metrics['step_s'] * 1e3:.1f} ms wall; CUDA kernel time per step {total / steps / 1e3:.1f} ms"]
    lines.append("| group | ms/step | share |")
    lines.append("|---|---|---|")
    for group, micros in sorted(by_group.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {micros / steps / 1e3:.1f} | {100 * micros / total:.1f}% |")
    for group in ("copy/cast", "fused elementwise (triton)"):
        members = sorted((e for e in kernels if group_of(e.key) == group), key=lambda e: -e.self_device_time_total)
        lines.append(f"\n{group}, largest:")
        for e in members[:8]:
            lines.append(f"{e.self_device_time_total / steps / 1e3:8.2f} ms x{e.count // steps:<5} {e.key[:110]}")
    lines.append(f"\ntop {top} kernels:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        share = 100 * e.self_device_time_total / total
        lines.append(
            f"{e.self_device_time_total / steps / 1e3:8.2f} ms {share:5.1f}% x{e.count // steps:<5} {e.key[:110]}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="lora-512", choices=sorted(OUR_CONFIGS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("--gaps", action="store_true", help="also where the GPU idles (bench/trace_gaps.py)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="whetstone-trace-") as folder:
        trace = args.trace or (Path(folder) / "trace.json" if args.gaps else None)
        prof, metrics = profile(args.config, args.warmup, args.steps, trace)
        print(report(prof, metrics, args.steps, args.top))
        if args.gaps:
            events = json.loads(trace.read_text())["traceEvents"]
            print("\n" + trace_gaps.report(trace_gaps.find_gaps(events), steps=args.steps, top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
