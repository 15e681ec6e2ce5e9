"""Predicted vs measured peak GPU memory of Z-Image LoRA / QLoRA training through the engine (full-size, random init).

Every measurement is a real ``training.engine.trainer.Trainer`` built from a ``TrainConfig`` (rank 128 on
attention+ffn, synthetic cached inputs with 128 caption tokens, eager, bf16 autocast with fp32 adapters; QLoRA:
bitsandbytes NF4 blocks): 1 warm-up + 2 measured ``train_step()``s, ``torch.cuda.max_memory_allocated`` of the
measured steps, compared with the analytic ``MemoryModel`` and the probe-calibrated one (``training.hardware.probe``
on the last main block of that Trainer's model, at the configuration's tokens). Then the memory caps: for 24 and 40
GiB (``set_per_process_memory_fraction``) it plans with the probe-calibrated model, builds the Trainer from the plan
and runs 5 steps; the peak must reach >= 85 % of the cap without OOM. Exit code 1 when a probe-calibrated prediction
is off by more than 10 %, or a capped run fails or uses less than 85 %.

    python bench/bench_memory.py --out runs/bench_memory.jsonl   # everything, ~4 min on an H100
    python bench/bench_memory.py --dry-run                       # CPU: the configurations, predictions and plans
    python bench/bench_memory.py --quick                         # one configuration per mode, one cap
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from memory_runs import (  # noqa: E402
    CAP_STEPS,
    CAPS,
    CAPTION_TOKENS,
    SHAPES,
    TARGETS,
    Config,
    calibrated_model,
    cap_plan,
    engine_run,
    plan_config,
    predict,
    tokens_per_sample,
)

from training.hardware.memory import GIB, MemoryModel  # noqa: E402
from training.hardware.plan import PlanRefused  # noqa: E402

logger = logging.getLogger("bench_memory")
MAX_ERROR = 0.10
MIN_CAP_USE = 0.85
WARMUP, STEPS = 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU only: print configurations, predictions, plans")
    parser.add_argument("--quick", action="store_true", help="first configuration of each mode and the first cap")
    parser.add_argument("--skip-qlora", action="store_true", help="skip the QLoRA configurations")
    parser.add_argument("--skip-caps", action="store_true", help="skip the memory-capped runs")
    parser.add_argument("--compiled", action="store_true", help="also run LoRA 512² bs4 compiled (extra, slow)")
    parser.add_argument("--out", default=None, help="append one JSON line per result to this file")
    parser.add_argument("--targets", default=TARGETS, help="LoRA target preset of every configuration")
    parser.add_argument("--caption-tokens", type=int, default=CAPTION_TOKENS, help="caption tokens per sample")
    parser.add_argument("--modes", default="lora,qlora", help="comma-separated modes to measure")
    parser.add_argument("--shapes", default=None, help="RESxBATCHxDEPTH,... instead of the 6 standard shapes")
    parser.add_argument("--caps", default=None, help="GIB@RES,... instead of the standard caps (24@512,40@1024)")
    parser.add_argument("--max-error", type=float, default=MAX_ERROR, help="largest accepted prediction error")
    return parser.parse_args(argv)


def selected_configs(args) -> list[Config]:
    modes = [m for m in args.modes.split(",") if not (args.skip_qlora and m == "qlora")]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    configs = [
        Config(mode=m, resolution=r, batch=b, depth=d, targets=args.targets, caption_tokens=args.caption_tokens)
        for m in modes
        for r, b, d in shapes
    ]
    if args.quick:
        configs = [next(c for c in configs if c.mode == mode) for mode in dict.fromkeys(c.mode for c in configs)]
    if args.compiled:
        configs.append(Config(mode="lora", resolution=512, batch=4, depth=0, compile=True))
    return configs


def selected_caps(args) -> list[tuple[int, int]]:
    caps = [tuple(map(int, c.split("@"))) for c in args.caps.split(",")] if args.caps else CAPS
    return [] if args.skip_caps else caps[:1] if args.quick else caps


# -------------------------------------------------------------------------------------------------------------
# CPU: what would run


def dry_run(args) -> int:
    analytic = MemoryModel()
    print("| config | tokens/sample | predicted GiB (analytic) | phase |\n|---|---|---|---|")
    for conf in selected_configs(args):
        estimate = predict(analytic, conf)
        print(
            f"| {conf.label()} | {tokens_per_sample(conf.resolution, conf.caption_tokens)} | {estimate.gib():.2f} | {estimate.phase} |"
        )
    for cap_gib, resolution in selected_caps(args):
        try:
            plan = cap_plan(
                cap_gib, resolution, analytic, simulated=True, caption_tokens=args.caption_tokens, targets=args.targets
            )
        except PlanRefused as refusal:
            print(f"\ncap {cap_gib} GiB at {resolution}²: refused\n{refusal}")
            continue
        print(f"\ncap {cap_gib} GiB at {resolution}²: {plan_config(plan, caption_tokens=args.caption_tokens).label()}, predicted "
              f"{plan.predicted_peak_bytes / GIB:.2f} GiB = {plan.predicted_peak_bytes / (cap_gib * GIB):.1%} of "
              f"the cap\n{plan.table()}")  # fmt: skip
    return 0


# -------------------------------------------------------------------------------------------------------------
# GPU: measure


def measure_config(conf: Config, analytic: MemoryModel, emit, max_error: float = MAX_ERROR) -> dict:
    started = time.perf_counter()
    row = {"test": "config", "config": conf.label(), **vars(conf)}
    print(f"-- {conf.label()}: building the Trainer", flush=True)
    run = engine_run(conf, warmup=WARMUP, steps=STEPS, probe=not conf.compile)
    trainable = run.get("trainable_params")
    row["analytic_gib"] = predict(analytic, conf, trainable).gib()
    if "coefficients" in run:
        row["probe_gib"] = predict(calibrated_model(analytic, conf.mode, run["coefficients"]), conf, trainable).gib()
    row.update(run, wall_s=time.perf_counter() - started)
    measured = row.get("measured_gib")
    for key in ("analytic", "probe"):
        if measured and key + "_gib" in row:
            row[key + "_error"] = row[key + "_gib"] / measured - 1
    checked = "probe_error" if "probe_gib" in row else "analytic_error"
    row["ok"] = conf.compile or ("error" not in row and abs(row.get(checked, 1.0)) <= max_error)
    return emit(row)


def measure_cap(cap_gib: int, resolution: int, memory_model: MemoryModel, analytic: MemoryModel, emit, args) -> dict:
    started = time.perf_counter()
    row = {"test": "cap", "cap_gib": cap_gib, "resolution": resolution, "model": _source(memory_model)}
    row.update(targets=args.targets, caption_tokens=args.caption_tokens)
    try:
        plan = cap_plan(
            cap_gib, resolution, memory_model, simulated=False, caption_tokens=args.caption_tokens, targets=args.targets
        )
    except PlanRefused as refusal:
        return emit({**row, "error": f"refused: {refusal}", "ok": False})
    print(plan.table(), flush=True)
    conf = plan_config(plan, caption_tokens=args.caption_tokens, targets=args.targets)
    row.update(config=conf.label(), micro_batch=conf.batch, depth=conf.depth, grad_accum=conf.grad_accum)
    print(f"-- cap {cap_gib} GiB: {conf.label()}, {CAP_STEPS} steps", flush=True)
    row.update(predicted_gib=plan.predicted_peak_bytes / GIB, budget_gib=plan.budget_bytes / GIB)
    row["analytic_plan_gib"] = predict(analytic, conf).gib()
    run = engine_run(conf, warmup=0, steps=CAP_STEPS, probe=False, cap_bytes=cap_gib * GIB)
    row.update(run, wall_s=time.perf_counter() - started)
    if "measured_gib" in run:
        row["peak_over_cap"] = run["measured_gib"] / cap_gib
        row["predicted_error"] = row["predicted_gib"] / run["measured_gib"] - 1
    row["ok"] = "error" not in row and row.get("peak_over_cap", 0) >= MIN_CAP_USE
    return emit(row)


def _source(memory_model: MemoryModel) -> str:
    return "probe-calibrated" if memory_model.calibrated else "analytic"


def run_bench(args, emit) -> list[dict]:
    analytic = MemoryModel()  # fp32 adapters, bf16 LoRA inputs: what the engine runs
    results = [measure_config(conf, analytic, emit, args.max_error) for conf in selected_configs(args)]
    for cap_gib, resolution in selected_caps(args):
        probes = [
            r for r in results if r.get("mode") == "lora" and r.get("resolution") == resolution and "coefficients" in r
        ]
        memory_model = calibrated_model(analytic, "lora", probes[-1]["coefficients"]) if probes else analytic
        results.append(measure_cap(cap_gib, resolution, memory_model, analytic, emit, args))
    return results


def emitter(out: str | None, started: float):
    def emit(row: dict) -> dict:
        row["gpu"] = torch.cuda.get_device_name()
        line = json.dumps(row)
        if out:
            with open(out, "a") as handle:
                handle.write(line + "\n")
        status = "ok" if row.get("ok") else "FAIL"
        print(f"[{time.perf_counter() - started:6.0f} s] {status} {line}", flush=True)
        return row

    return emit


def markdown(results: list[dict]) -> str:
    lines = ["| config | analytic GiB | probe GiB | measured GiB | analytic error | probe error | build s | step s |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in (r for r in results if r["test"] == "config"):
        lines.append(
            f"| {r['config']} | {_num(r.get('analytic_gib'))} | {_num(r.get('probe_gib'))} | "
            f"{_num(r.get('measured_gib')) if 'error' not in r else r['error'][:40]} | "
            f"{_pct(r.get('analytic_error'))} | {_pct(r.get('probe_error'))} | {_num(r.get('build_s'), 1)} | "
            f"{_num(r.get('step_s'))} |"
        )
    caps = [r for r in results if r["test"] == "cap"]
    if caps:
        lines += ["", "| cap | plan | predicted GiB | measured GiB | peak / cap | max reserved GiB | result |"]
        lines.append("|---|---|---|---|---|---|---|")
    for r in caps:
        lines.append(
            f"| {r['cap_gib']} GiB at {r['resolution']}² | {r.get('config', '-')} ({r['model']}) | "
            f"{_num(r.get('predicted_gib'))} | {_num(r.get('measured_gib'))} | {_pct(r.get('peak_over_cap'), signed=False)} "
            f"| {_num(r.get('reserved_gib'))} | {'ok' if r['ok'] else r.get('error', 'under 85 %')[:60]} |"
        )
    return "\n".join(lines)


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value, signed: bool = True) -> str:
    return "-" if value is None else f"{value:+.1%}" if signed else f"{value:.1%}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        raise SystemExit("bench_memory needs a CUDA GPU; use --dry-run to check the planning side on CPU")
    started = time.perf_counter()
    results = run_bench(args, emitter(args.out, started))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s\n")
    print(markdown(results))
    failed = [r.get("config", r.get("cap_gib")) for r in results if not r["ok"]]
    print(
        f"\nbench_memory: {len(results) - len(failed)} of {len(results)} ok" + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    # Before the first CUDA allocation: segments that grow in place keep fragmentation inside the planner's margin.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    raise SystemExit(main())
