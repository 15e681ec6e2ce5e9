"""The 8, 12 and 16 GB tiers' plans, run on one big GPU with the process's memory capped to the card's size.

For each case (tier, resolution) the planner plans LoRA for the tier's simulated card; the engine's ``Trainer`` runs
that plan's ``TrainConfig`` (synthetic cached inputs, full-size random-init Z-Image) under
``torch.cuda.set_per_process_memory_fraction(cap)`` for ``--steps`` steps. Measured: OOMs (must be 0), the peak
``max_memory_allocated`` and ``max_memory_reserved`` against the cap, the planner's predicted peak against the
measured one (``--max-error``, 5 %), img/s on the honest step clock (``engine.step_clock``, checked against the wall
clock by ``engine.timing.window_rate``), and, with block swap, the host-to-device bytes per step and the share of the
copy time hidden behind compute (CUDA events on the side stream and around each wait of the compute stream). Each
case also runs uncapped with the levers off (bf16 base, no swap; same micro-batch, accumulation and checkpointing):
its img/s is the reference, and the loss curves must agree within ``--loss-tolerance`` (mean |difference| / mean
loss, same seed, same data); ``--isolate`` adds an uncapped FP8-only run so swap and FP8 are judged apart.

``--parallel`` runs each case's capped run and its reference in two processes on the GPU at the same time (this
script with ``--only capped`` and ``--only reference``), then judges them together: for plans whose micro-batch of one
leaves the GPU mostly idle, the pair takes little more than one run's time. Their speeds are then measured while
sharing the GPU and are not speed figures; the two processes' random models are checked to be identical (a
fingerprint of the weights), and each one's own memory outside its allocator is checked per process (nvidia-smi).

The model is random-initialised once on the GPU and kept in pinned host memory; every run's model is built on the
meta device and given those tensors (nothing is re-initialised). Before each capped run the bench checks that the
allocator holds nothing and that no other process or context holds more than ``OTHER_LIMIT`` of the GPU.

    python bench/bench_small_cards.py --out "$OUT"                 # 4 cases, 8 steps each (~3 min on an H200)
    python bench/bench_small_cards.py --steps 200 --cases 1x8GB@1024  # the issue's 200 steps for one case
    python bench/bench_small_cards.py --steps 200 --parallel --cases 1x8GB@512  # capped and reference at once
    python bench/bench_small_cards.py --steps 200 --reference-steps 12 --cases 1x12GB@1024  # long capped, short ref.
    python bench/bench_small_cards.py --dry-run                    # CPU: the plans only
    python bench/bench_small_cards.py --smoke                      # CPU: the whole bench on a small model
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from training.engine.config import TrainConfig  # noqa: E402
from training.hardware.memory import GIB, MemoryModel  # noqa: E402
from training.hardware.offload import CONSUMER_PCIE_BYTES_PER_S  # noqa: E402
from training.hardware.plan import PlanRequest, TrainingPlan, make_plan  # noqa: E402
from training.hardware.tiers import load_tiers, simulated_profile  # noqa: E402
from training.model.config import PRESETS  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_cards_runs import Master, free_device, run  # noqa: E402

logger = logging.getLogger("bench_small_cards")

CASES = ("1x8GB@512", "1x8GB@1024", "1x12GB@1024", "1x16GB@1024")
RANKS = {"1x8GB": 16, "1x12GB": 16, "1x16GB": 32}  # the tiers' workflows (tools.make_workflows.JOBS)
CAPS_GIB = {"1x8GB": 8, "1x12GB": 12, "1x16GB": 16}
RUN_KINDS = ("capped", "reference")
SMOKE_MODEL = PRESETS["tiny"].replace(n_layers=6)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="TIER@RESOLUTION,... (tiers 1x8GB, 1x12GB, 1x16GB)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rate and the peak")
    parser.add_argument("--reference-steps", type=int, help="steps of the levers-off reference (default: --steps)")
    parser.add_argument("--parallel", action="store_true", help="capped run and reference in two processes at once")
    parser.add_argument("--only", choices=RUN_KINDS, help=argparse.SUPPRESS)  # one half of --parallel
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)  # --only capped: written once the GPU was checked
    parser.add_argument("--max-error", type=float, default=0.05, help="largest |predicted / measured peak - 1|")
    parser.add_argument("--loss-tolerance", type=float, default=0.02, help="mean |loss difference| / mean loss")
    parser.add_argument("--isolate", action="store_true", help="also run FP8 without swap, uncapped, per swap case")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_small_cards.json ($OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: print the plans, run nothing")
    parser.add_argument("--smoke", action="store_true", help="CPU: run the bench on a 6-block model, levers forced")
    args = parser.parse_args(argv)
    args.reference_steps = args.reference_steps or args.steps
    for name in ("steps", "reference_steps"):
        if getattr(args, name) <= args.warmup:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} must exceed --warmup {args.warmup}")
    if args.parallel and (args.isolate or args.only or args.dry_run):
        parser.error("--parallel runs the capped run and the reference only: leave out --isolate/--only/--dry-run")
    return args


# -------------------------------------------------------------------------------------------------------------
# plans


def case_plan(case: str, *, smoke: bool = False) -> tuple[str, int, TrainingPlan]:
    tier_name, _, resolution = case.partition("@")
    tiers = load_tiers()
    if tier_name not in CAPS_GIB or not resolution.isdigit():
        raise SystemExit(f"--cases: {case!r} is not TIER@RESOLUTION with TIER one of {sorted(CAPS_GIB)}")
    tier = tiers[tier_name]
    forced = {"base_storage": "fp8", "swap_blocks": 4, "checkpoint_depth": 6} if smoke else {}
    request = PlanRequest(
        mode="lora",
        resolution=int(resolution),
        lora_rank=RANKS[tier_name],
        model=SMOKE_MODEL if smoke else PRESETS["z-image"],
        **forced,
    )
    return tier_name, CAPS_GIB[tier_name] * GIB, make_plan(request, simulated_profile(tier), tier=tier)


def run_config(plan: TrainingPlan, run_dir: str, steps: int, **levers) -> TrainConfig:
    """The plan's config on synthetic data; ``levers`` override the plan's fp8_base / swap_blocks (reference runs)."""
    config = TrainConfig.from_plan(
        plan,
        run={"output_dir": run_dir, "steps": steps, "resume": False, "save_state": False, "seed": 0},
        data={"synthetic": True, "resolution": plan.resolution[0], "caption_dropout": 0.0},
        lora={},
        optim={"grad_clip": 1.0},
    )
    if levers:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, **levers))
    return config


# -------------------------------------------------------------------------------------------------------------
# a case: capped plan, uncapped references, verdicts


def loss_gap(losses: list[float], reference: list[float]) -> float:
    """Mean |difference| / mean |reference| over the steps both runs made (a shorter reference: its steps)."""
    pairs = list(zip(losses, reference))
    return sum(abs(a - b) for a, b in pairs) / sum(abs(b) for _, b in pairs)


def plan_row(case: str, smoke: bool) -> tuple[dict, int, TrainingPlan]:
    tier_name, cap, plan = case_plan(case, smoke=smoke)
    print(f"\n== {case}: cap {cap / GIB:.0f} GiB\n{plan.table()}", flush=True)
    row = {"case": case, "tier": tier_name, "resolution": plan.resolution[0], "rank": plan.lora_rank, "cap_bytes": cap}
    row.update(
        base_storage=plan.base_storage,
        swap_blocks=plan.swap_blocks,
        micro_batch=plan.micro_batch,
        grad_accum=plan.grad_accum,
        checkpoint_depth=plan.checkpoint_depth,
        predicted_gib=plan.predicted_peak_bytes / GIB,
        budget_gib=plan.budget_bytes / GIB,
        predicted_swap_bytes_per_step=plan.swap_bytes_per_step,
    )
    return row, cap, plan


def run_case(case: str, master: Master, device: torch.device, args) -> dict:
    """The case's runs (``args.only``: one of them), unjudged."""
    row, cap, plan = plan_row(case, args.smoke)
    kinds = [args.only] if args.only else list(RUN_KINDS)
    ready = None if not args.ready_file else (lambda: Path(args.ready_file).write_text(case))
    with tempfile.TemporaryDirectory(prefix="whetstone-small-") as run_dir:
        warmup = args.warmup
        if "capped" in kinds:
            capped_cap = cap if device.type == "cuda" else None
            config = run_config(plan, run_dir, args.steps)
            row["capped"] = run("plan, capped", config, master, device, capped_cap, warmup, on_checked=ready)
        if "reference" in kinds:
            off = run_config(plan, run_dir, args.reference_steps, fp8_base=False, swap_blocks=0)
            alone = args.only is None
            row["reference"] = run(
                "levers off, uncapped", off, master, device, None, warmup, probe_plan=plan, alone=alone
            )
        if args.isolate and plan.swap_blocks:
            fp8_only = run_config(plan, run_dir, args.steps, swap_blocks=0)
            row["fp8_only"] = run("FP8 only, uncapped", fp8_only, master, device, None, warmup)
    return row


def run_parallel(args, cases: list[str]) -> tuple[list[dict], dict]:
    """This script twice at once, ``--only capped`` and ``--only reference``; their rows joined per case. The
    reference starts once the capped process has checked the GPU alone (so the check still proves that nothing but
    its own allocator holds memory in it); only one case is allowed, so that holds for every capped run."""
    if len(cases) != 1:
        raise SystemExit("--parallel takes one case (--cases TIER@RESOLUTION): run it once per case")
    common = ["--cases", cases[0], "--steps", str(args.steps), "--warmup", str(args.warmup)]
    common += ["--reference-steps", str(args.reference_steps)] + (["--smoke"] if args.smoke else [])
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="whetstone-small-parallel-") as folder:
        ready = Path(folder) / "capped-checked"
        capped = subprocess.Popen(
            [
                sys.executable,
                script,
                *common,
                "--only",
                "capped",
                "--ready-file",
                str(ready),
                "--out",
                f"{folder}/capped",
            ]
        )
        while not ready.exists() and capped.poll() is None:
            time.sleep(0.5)
        reference = subprocess.Popen(
            [sys.executable, script, *common, "--only", "reference", "--out", f"{folder}/reference"]
        )
        codes = {"capped": capped.wait(), "reference": reference.wait()}
        halves = {}
        for kind in RUN_KINDS:
            path = Path(folder) / kind / "bench_small_cards.json"
            if not path.is_file():
                raise SystemExit(f"--parallel: the {kind} process (exit code {codes[kind]}) wrote no {path.name}")
            halves[kind] = json.loads(path.read_text())
    fingerprints = {kind: half["master_fingerprint"] for kind, half in halves.items()}
    (capped_row,), (reference_row,) = halves["capped"]["cases"], halves["reference"]["cases"]
    row = {**capped_row, "reference": reference_row.get("reference")}
    if len(set(fingerprints.values())) != 1:
        row["model_mismatch"] = fingerprints
    return [row], {
        "parallel": True,
        "children": {k: {"wall_s": h["wall_s"], "exit": codes[k]} for k, h in halves.items()},
    }


def verdict(row: dict, cap: int, args) -> dict:
    capped, reference = row.get("capped") or {}, row.get("reference") or {}
    problems = [f"{name} did not run" for name, r in (("capped", capped), ("reference", reference)) if not r]
    problems += [f"{name}: {r['error']}" for name, r in (("capped", capped), ("reference", reference)) if "error" in r]
    if "model_mismatch" in row:
        problems.append(f"the two processes built different random models: {row['model_mismatch']}")
    if not problems:
        if "peak_gib" in capped:
            row["predicted_error"] = row["predicted_gib"] / capped["peak_gib"] - 1
            if capped["reserved_gib"] * GIB > cap:
                problems.append(f"reserved {capped['reserved_gib']:.2f} GiB over the cap")
            if abs(row["predicted_error"]) > args.max_error:
                problems.append(f"predicted peak off by {row['predicted_error']:+.1%}")
            if "probe_predicted_gib" in reference:
                row["probe_predicted_error"] = reference["probe_predicted_gib"] / capped["peak_gib"] - 1
        row["speed_vs_reference"] = capped["img_per_s"] / reference["img_per_s"]
        row["loss_gap"] = loss_gap(capped["losses"], reference["losses"])
        if row["loss_gap"] > args.loss_tolerance:
            problems.append(f"loss differs from the levers-off run by {row['loss_gap']:.2%}")
        if "fp8_only" in row and "error" not in row["fp8_only"]:
            row["swap_loss_gap"] = loss_gap(capped["losses"], row["fp8_only"]["losses"])
            row["fp8_loss_gap"] = loss_gap(row["fp8_only"]["losses"], reference["losses"])
        if "swap_bytes_per_step" in capped:
            moved = capped["swap_bytes_per_step"]
            row["swap_bytes_vs_predicted"] = moved / row["predicted_swap_bytes_per_step"] - 1
            row["consumer_copy_s_per_step"] = moved / CONSUMER_PCIE_BYTES_PER_S
            row["consumer_pcie_assumed_gb_per_s"] = CONSUMER_PCIE_BYTES_PER_S / 1e9
    row["problems"] = problems
    row["ok"] = not problems
    return row


def summary(rows: list[dict]) -> str:
    lines = [
        "| case | levers | peak / cap GiB | predicted (error) | probe error | img/s capped / reference | loss gap "
        "| swap GiB/step, hidden | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "capped" not in r:
            lines.append(f"| {r['case']} | {'; '.join(r['problems'])[:200]} |  |  |  |  |  |  | FAIL |")
            continue
        c = r["capped"]
        levers = f"{r['base_storage']}, swap {r['swap_blocks']}, mb {r['micro_batch']}x{r['grad_accum']}, ckpt {r['checkpoint_depth']}"
        peak = f"{c.get('peak_gib', float('nan')):.2f} / {r['capped']['cap_gib'] or float('nan'):.0f}"
        error = f"{r['predicted_gib']:.2f} ({r.get('predicted_error', float('nan')):+.1%})"
        speed = f"{c.get('img_per_s', float('nan')):.3f} / {r['reference'].get('img_per_s', float('nan')):.3f}"
        swap = "-"
        if "swap_bytes_per_step" in c:
            hidden = c.get("swap_hidden")
            swap = f"{c['swap_bytes_per_step'] / GIB:.2f}, {'-' if hidden is None else f'{hidden:.0%}'}"
        gap = f"{r.get('loss_gap', float('nan')):.2%}"
        probe = f"{r.get('probe_predicted_error', float('nan')):+.1%}"
        lines.append(f"| {r['case']} | {levers} | {peak} | {error} | {probe} | {speed} | {gap} | {swap} | {'ok' if r['ok'] else 'FAIL'} |")  # fmt: skip
    return "\n".join(lines)


def measure(args, cases: list[str], device: torch.device) -> tuple[list[dict], dict]:
    """The cases in this process on one master model; rows judged unless this is one half of ``--parallel``."""
    master = Master(SMOKE_MODEL if args.smoke else PRESETS["z-image"], device)
    rows = []
    for case in cases:
        try:
            row = run_case(case, master, device, args)
            rows.append(row if args.only else verdict(row, row["cap_bytes"], args))
        except Exception as error:  # the other cases still run; this one fails the bench (exit code 1)
            logger.exception("case %s failed", case)
            rows.append({"case": case, "ok": False, "problems": [f"{type(error).__name__}: {error}"]})
            free_device()
        brief = {k: v for k, v in rows[-1].items() if k not in ("capped", "reference", "fp8_only")}
        print(json.dumps(brief), flush=True)
    return rows, {"master_build_s": master.build_s, "master_fingerprint": master.fingerprint}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    cases = [c for c in args.cases.split(",") if c]
    if args.dry_run:
        for case in cases:
            _, cap, plan = case_plan(case)
            print(f"\n== {case}: cap {cap / GIB:.0f} GiB\n{plan.table()}")
        return 0
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_small_cards needs a CUDA GPU; --dry-run prints the plans, --smoke runs on the CPU")
    device = torch.device("cuda", 0) if not args.smoke else torch.device("cpu")
    started = time.perf_counter()
    if args.parallel:
        rows, extra = run_parallel(args, cases)
        rows = [verdict(row, row["cap_bytes"], args) for row in rows]
    else:
        rows, extra = measure(args, cases, device)
    result = {
        "bench": "bench_small_cards",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "steps": args.steps,
        "reference_steps": args.reference_steps,
        "warmup": args.warmup,
        "wall_s": time.perf_counter() - started,
        **extra,
        "cuda_context_assumed_gib": MemoryModel().cuda_context_bytes / GIB,
        "cases": rows,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_small_cards.json").write_text(json.dumps(result, indent=1))
    if args.only:
        return 0 if all("error" not in (r.get(args.only) or {"error": 1}) for r in rows) else 1
    print("\n" + summary(rows))
    failed = [r["case"] for r in rows if not r["ok"]]
    for r in rows:
        for problem in r["problems"]:
            print(f"FAIL {r['case']}: {problem}")
    print(f"\nbench_small_cards: {len(rows) - len(failed)} of {len(rows)} ok in {result['wall_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    # Before the first CUDA allocation: segments that grow in place keep fragmentation inside the planner's margin.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    raise SystemExit(main())
