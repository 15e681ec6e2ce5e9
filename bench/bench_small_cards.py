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

The model is random-initialised once on the GPU and kept in pinned host memory; every run's model is built on the
meta device and given those tensors (nothing is re-initialised). Before each capped run the bench checks that the
allocator holds nothing and that no other process or context holds more than ``OTHER_LIMIT`` of the GPU.

    python bench/bench_small_cards.py --out "$OUT"                 # 4 cases, 8 steps each (~3 min on an H200)
    python bench/bench_small_cards.py --steps 200 --cases 1x8GB@1024  # the issue's 200 steps for one case
    python bench/bench_small_cards.py --dry-run                    # CPU: the plans only
    python bench/bench_small_cards.py --smoke                      # CPU: the whole bench on a small model
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
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
from training.hardware.memory import GIB, MemoryModel  # noqa: E402
from training.hardware.offload import CONSUMER_PCIE_BYTES_PER_S  # noqa: E402
from training.hardware.plan import PlanRequest, TrainingPlan, make_plan  # noqa: E402
from training.hardware.tiers import load_tiers, simulated_profile  # noqa: E402
from training.model.config import PRESETS, ZImageConfig  # noqa: E402

logger = logging.getLogger("bench_small_cards")

CASES = ("1x8GB@512", "1x8GB@1024", "1x12GB@1024", "1x16GB@1024")
RANKS = {"1x8GB": 16, "1x12GB": 16, "1x16GB": 32}  # the tiers' workflows (tools.make_workflows.JOBS)
CAPS_GIB = {"1x8GB": 8, "1x12GB": 12, "1x16GB": 16}
OTHER_LIMIT = 2 * GIB  # device memory outside this process's allocator (CUDA context, other processes)
LEFTOVER_LIMIT = 256 * 2**20  # allocated between runs: cuBLAS workspaces stay, a run's tensors must not
SMOKE_MODEL = PRESETS["tiny"].replace(n_layers=6)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="TIER@RESOLUTION,... (tiers 1x8GB, 1x12GB, 1x16GB)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rate and the peak")
    parser.add_argument("--max-error", type=float, default=0.05, help="largest |predicted / measured peak - 1|")
    parser.add_argument("--loss-tolerance", type=float, default=0.02, help="mean |loss difference| / mean loss")
    parser.add_argument("--isolate", action="store_true", help="also run FP8 without swap, uncapped, per swap case")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_small_cards.json ($OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: print the plans, run nothing")
    parser.add_argument("--smoke", action="store_true", help="CPU: run the bench on a 6-block model, levers forced")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
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
# the model, built once


class Master:
    """The random-init base in (pinned) host memory; ``model()`` gives a new model holding those tensors."""

    def __init__(self, model_config: ZImageConfig, device: torch.device) -> None:
        from training.engine.build import random_model

        started = time.perf_counter()
        model = random_model(model_config, dtype=torch.bfloat16, device=device, seed=0)
        pin = device.type == "cuda"
        self.state = {}
        for name, tensor in model.state_dict().items():
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            self.state[name] = host.copy_(tensor)
        self.config = model_config
        del model
        _free()
        self.build_s = time.perf_counter() - started
        print(f"master model: {model_config.total_params() / 1e9:.2f} B parameters in {self.build_s:.1f} s", flush=True)

    def model(self):
        from training.model.zimage import ZImageTransformer

        with torch.device("meta"):
            model = ZImageTransformer(self.config)
        model.load_state_dict(self.state, strict=True, assign=True)
        return model


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------------------
# one run


def device_check(device: torch.device) -> dict:
    """Next to nothing allocated by this process (cuBLAS workspaces), and what else holds device memory (the CUDA
    context, other processes): the cap bounds this allocator only."""
    if device.type != "cuda":
        return {"other_gib": 0.0}
    _free()
    allocated = torch.cuda.memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    other = total - free - torch.cuda.memory_reserved(device)
    if allocated > LEFTOVER_LIMIT:
        raise RuntimeError(f"{allocated / GIB:.2f} GiB still allocated before a run: the previous run leaked")
    if other > OTHER_LIMIT:
        raise RuntimeError(f"{other / GIB:.1f} GiB of the GPU is held outside this allocator: another process runs")
    return {"other_gib": other / GIB, "leftover_gib": allocated / GIB, "total_gib": total / GIB}


def run(
    label: str,
    config: TrainConfig,
    master: Master,
    device: torch.device,
    cap_bytes: int | None,
    warmup: int,
    probe_plan: TrainingPlan | None = None,
) -> dict:
    """Build a Trainer on ``master``'s weights and run ``config.run.steps`` steps; an OOM is recorded, not raised."""
    from training.engine.block_swap import block_swap_of
    from training.engine.distributed import init_distributed, shutdown_distributed
    from training.engine.parallelize import unwrap
    from training.engine.trainer import Trainer
    from training.run.events import RunLog

    row: dict = {"run": label, "cap_gib": None if cap_bytes is None else cap_bytes / GIB, **device_check(device)}
    row.update(fp8_base=config.run.fp8_base, swap_blocks=config.run.swap_blocks)
    dist_info = init_distributed(timeout_s=600)
    log = RunLog(config.run.output_dir, rank=0)
    trainer = None
    try:
        if cap_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(
                cap_bytes / torch.cuda.get_device_properties(device).total_memory
            )
        started = time.perf_counter()
        trainer = Trainer.build(config, dist_info, log, model=master.model())
        row["build_s"] = time.perf_counter() - started
        swap = block_swap_of(unwrap(trainer.model))
        if swap is not None:
            swap.measure = device.type == "cuda"
        row.update(_steps(trainer, swap, config.run.steps, warmup, device, label))
        if probe_plan is not None and device.type == "cuda":
            row["probe_predicted_gib"] = probe_prediction(unwrap(trainer.model), probe_plan) / GIB
    except torch.OutOfMemoryError as error:
        row["error"] = "OOM: " + str(error).splitlines()[0][:300]
    finally:
        trainer = None
        log.close()
        shutdown_distributed()
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        _free()
    return row


def _steps(trainer, swap, steps: int, warmup: int, device: torch.device, label: str) -> dict:
    from training.engine.timing import window_rate

    events, losses, swaps = [], [], []
    for step in range(steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        metrics = trainer.train_step()
        events.append({"time": time.time(), "step_s": metrics["step_s"], "img_per_s": metrics["img_per_s"]})
        losses.append(metrics["loss"])
        if swap is not None:
            stats = swap.take_stats()
            swaps.append({"bytes": stats.bytes, "copy_s": stats.copy_s, "stall_s": stats.stall_s})
        trainer.step += 1
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(
                f"  {label}: step {step + 1}/{steps} loss {metrics['loss']:.4f} {metrics['step_s']:.2f} s", flush=True
            )
    window = window_rate(events, warmup=warmup)
    result = {
        "losses": losses,
        "img_per_s": window.img_per_s,
        "median_step_s": window.median_step_s,
        "timer_vs_wall": window.disagreement,
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    if swaps:
        timed = swaps[warmup:]
        copy_s, stall_s = sum(s["copy_s"] for s in timed), sum(s["stall_s"] for s in timed)
        result["swap_bytes_per_step"] = sum(s["bytes"] for s in timed) / len(timed)
        result["swap_copy_s_per_step"] = copy_s / len(timed)
        result["swap_stall_s_per_step"] = stall_s / len(timed)
        result["swap_hidden"] = None if copy_s <= 0 else max(0.0, 1 - stall_s / copy_s)
        result["swap_gb_per_s"] = (
            None if copy_s <= 0 else result["swap_bytes_per_step"] / result["swap_copy_s_per_step"] / 1e9
        )
    return result


def probe_prediction(model, plan: TrainingPlan) -> int:
    """The plan's peak predicted with activation coefficients measured on this model's last main block (the probe
    the planner calibrates from on a GPU), levers, micro-batch and depth as planned."""
    from training.hardware.memory import image_tokens_for, padded
    from training.hardware.probe import probe_coefficients

    image_tokens, caption_tokens = image_tokens_for(plan.resolution, model.config), padded(plan.caption_tokens)
    block = model.layers[-1]
    block = getattr(block, "_checkpoint_wrapped_module", block)
    coefficients = probe_coefficients(
        block,
        model.config,
        micro_batch=plan.micro_batch,
        tokens_per_sample=image_tokens + caption_tokens,
        mode="lora",
        lora_rank=plan.lora_rank,
    )
    calibrated = MemoryModel(model=model.config).calibrated_from_probe("lora", coefficients, plan.lora_rank)
    estimate = calibrated.predict_peak(
        "lora",
        plan.micro_batch,
        image_tokens,
        caption_tokens,
        plan.checkpoint_depth,
        1,
        plan.lora_rank,
        lora_targets=plan.lora_targets,
        parallelism="none",
        grad_accum=plan.grad_accum,
        attention_backend=plan.attention_backend,
        base_storage=plan.base_storage,
        swap_blocks=plan.swap_blocks,
    )
    return estimate.peak_bytes


# -------------------------------------------------------------------------------------------------------------
# a case: capped plan, uncapped references, verdicts


def loss_gap(losses: list[float], reference: list[float]) -> float:
    pairs = list(zip(losses, reference, strict=True))
    return sum(abs(a - b) for a, b in pairs) / sum(abs(b) for _, b in pairs)


def run_case(case: str, master: Master, device: torch.device, args) -> dict:
    tier_name, cap, plan = case_plan(case, smoke=args.smoke)
    print(f"\n== {case}: cap {cap / GIB:.0f} GiB\n{plan.table()}", flush=True)
    capped_cap = cap if device.type == "cuda" else None
    row = {"case": case, "tier": tier_name, "resolution": plan.resolution[0], "rank": plan.lora_rank}
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
    with tempfile.TemporaryDirectory(prefix="whetstone-small-") as run_dir:
        steps, warmup = args.steps, args.warmup
        row["capped"] = run("plan, capped", run_config(plan, run_dir, steps), master, device, capped_cap, warmup)
        off = run_config(plan, run_dir, steps, fp8_base=False, swap_blocks=0)
        row["reference"] = run("levers off, uncapped", off, master, device, None, warmup, probe_plan=plan)
        if args.isolate and plan.swap_blocks:
            fp8_only = run_config(plan, run_dir, steps, swap_blocks=0)
            row["fp8_only"] = run("FP8 only, uncapped", fp8_only, master, device, None, warmup)
    return verdict(row, cap, args)


def verdict(row: dict, cap: int, args) -> dict:
    capped, reference = row["capped"], row["reference"]
    problems = [f"{name}: {r['error']}" for name, r in (("capped", capped), ("reference", reference)) if "error" in r]
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
    master = Master(SMOKE_MODEL if args.smoke else PRESETS["z-image"], device)
    rows = []
    for case in cases:
        try:
            rows.append(run_case(case, master, device, args))
        except Exception as error:  # the other cases still run; this one fails the bench (exit code 1)
            logger.exception("case %s failed", case)
            rows.append({"case": case, "ok": False, "problems": [f"{type(error).__name__}: {error}"]})
            _free()
        print(
            json.dumps({k: v for k, v in rows[-1].items() if k not in ("capped", "reference", "fp8_only")}), flush=True
        )
    result = {
        "bench": "bench_small_cards",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "wall_s": time.perf_counter() - started,
        "master_build_s": master.build_s,
        "cuda_context_assumed_gib": MemoryModel().cuda_context_bytes / GIB,
        "cases": rows,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_small_cards.json").write_text(json.dumps(result, indent=1))
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
