"""Predicted vs measured peak GPU memory of Z-Image LoRA / QLoRA training (full-size, random init, bf16).

One process builds the 6.15 B model once on CUDA, attaches LoRA (peft, rank 128, fp32 adapters by default) and
runs, per configuration, 1 warm-up + 2 measured AdamW steps with the first ``depth`` main blocks checkpointed
(``torch.utils.checkpoint``, non-reentrant). It compares ``torch.cuda.max_memory_allocated`` with the analytic
prediction and with the probe-calibrated one (``training.hardware.probe``, one block at the target token count).
Then the memory-capped test: for 24 and 40 GiB caps (``set_per_process_memory_fraction``) it plans with the
probe-calibrated model, runs 5 optimizer steps of the plan and reports peak / cap. Last, QLoRA: the block Linears
are swapped in place for NF4 storage equal in bytes to bitsandbytes' Linear4bit with double quantisation (4-bit
codes, 8-bit absmax per 64, fp32 per 256 absmax, dequantised to bf16 per call; bitsandbytes is not on the device)
and the configurations run again.

    python bench/bench_memory.py                # everything, ~5 min on an H100
    python bench/bench_memory.py --dry-run      # CPU: the configurations and the plans, no GPU
    python bench/bench_memory.py --probe        # only the probe: print measured vs analytic coefficients
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from training.hardware.discovery import discover  # noqa: E402
from training.hardware.memory import GIB, MemoryModel, image_tokens_for, padded  # noqa: E402
from training.hardware.plan import PlanRefused, PlanRequest, make_plan  # noqa: E402
from training.hardware.tiers import load_tiers, simulated_profile  # noqa: E402
from training.model.config import PRESETS  # noqa: E402

logger = logging.getLogger("bench_memory")
CONFIGS = [(512, 4, 0), (512, 8, 15), (512, 16, 30), (1024, 1, 0), (1024, 2, 15), (1024, 4, 30)]  # res, batch, depth
CAPS = [(24, 512), (40, 1024)]  # GiB cap, resolution
CAPTION_TOKENS = 128
RANK = 128
CAP_TARGET_GLOBAL_BATCH = 16


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU only: print configurations and plans")
    parser.add_argument("--probe", action="store_true", help="only run the probe for each configuration")
    parser.add_argument("--lora-dtype", choices=("fp32", "bf16"), default="fp32", help="adapter and AdamW dtype")
    parser.add_argument("--skip-qlora", action="store_true", help="skip the QLoRA configurations")
    parser.add_argument("--skip-caps", action="store_true", help="skip the memory-capped runs")
    parser.add_argument("--quick", action="store_true", help="first configuration of each part only")
    parser.add_argument("--out", default=None, help="append one JSON line per result to this file")
    return parser.parse_args(argv)


def tokens_per_sample(resolution: int) -> int:
    return image_tokens_for((resolution, resolution)) + padded(CAPTION_TOKENS)


def predict(memory_model: MemoryModel, mode: str, resolution: int, batch: int, depth: int, trainable: int) -> int:
    return memory_model.predict_peak(
        mode,
        batch,
        image_tokens_for((resolution, resolution)),
        padded(CAPTION_TOKENS),
        depth,
        1,
        RANK,
        trainable_params=trainable,
    ).peak_bytes


def cap_request(resolution: int, trainable: int | None) -> PlanRequest:
    return PlanRequest(
        mode="lora",
        resolution=resolution,
        caption_tokens=CAPTION_TOKENS,
        lora_rank=RANK,
        target_global_batch=CAP_TARGET_GLOBAL_BATCH,
        compile=False,
        trainable_params=trainable,
    )


def capped_profile(cap_bytes: int, memory_model: MemoryModel, simulated: bool):
    """A profile whose budget is the cap: the per-process fraction excludes the CUDA context, so offer cap + context."""
    offered = cap_bytes + memory_model.cuda_context_bytes
    if not simulated:
        return discover(free_bytes_override=offered)
    profile = simulated_profile(load_tiers()["1x80GB"])
    return dataclasses.replace(profile, gpus=(dataclasses.replace(profile.gpus[0], free_bytes=offered),))


def dry_run(args) -> int:
    memory_model = MemoryModel(lora_param_bytes=4 if args.lora_dtype == "fp32" else 2)
    print(f"{'mode':<6} {'res':>5} {'batch':>5} {'depth':>5} {'tokens':>6} {'predicted GiB':>13}")
    for mode in ("lora", "qlora"):
        for resolution, batch, depth in CONFIGS:
            peak = predict(memory_model, mode, resolution, batch, depth, trainable=None)
            print(
                f"{mode:<6} {resolution:>5} {batch:>5} {depth:>5} {tokens_per_sample(resolution):>6} {peak / GIB:>13.2f}"
            )
    for cap_gib, resolution in CAPS:
        try:
            plan = make_plan(cap_request(resolution, None), capped_profile(cap_gib * GIB, memory_model, True))
        except PlanRefused as refusal:
            print(f"cap {cap_gib} GiB at {resolution}px refused:\n{refusal}")
            continue
        print(f"\ncap {cap_gib} GiB at {resolution}px:\n{plan.table()}")
    return 0


# -------------------------------------------------------------------------------------------------------------
# GPU side


class Checkpointed(torch.nn.Module):
    """Runs ``block`` under non-reentrant activation checkpointing, as the engine does for the first blocks."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False)


def set_checkpoint_depth(model, depth: int) -> None:
    blocks = [b.block if isinstance(b, Checkpointed) else b for b in model.layers]
    for index, block in enumerate(blocks):
        model.layers[index] = Checkpointed(block) if index < depth else block


def build_model(lora_dtype: str):
    from training.model.lora import LoraSettings, attach_lora
    from training.model.zimage import ZImageTransformer

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = ZImageTransformer(PRESETS["z-image"])
    finally:
        torch.set_default_dtype(default)
    attach_lora(model, LoraSettings(rank=RANK, targets="attention+ffn"), dtype=_DTYPES[lora_dtype])
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable, torch.optim.AdamW(trainable, lr=1e-5, fused=True)


_DTYPES = {"fp32": torch.float32, "bf16": None}


def train_steps(model, optimizer, resolution: int, batch: int, steps: int, grad_accum: int = 1) -> None:
    latent = resolution // 8
    for _ in range(steps):
        for _ in range(grad_accum):
            latents = torch.randn(batch, 16, latent, latent, device="cuda", dtype=torch.bfloat16)
            captions = torch.randn(batch, CAPTION_TOKENS, 2560, device="cuda", dtype=torch.bfloat16)
            sigma = torch.rand(batch, device="cuda")
            out = model(latents, sigma, captions)
            loss = torch.nn.functional.mse_loss(out.float(), latents.float()) / grad_accum
            loss.backward()
            del out, loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def measure_peak(model, optimizer, resolution: int, batch: int, steps: int = 2, grad_accum: int = 1) -> int:
    train_steps(model, optimizer, resolution, batch, 1)  # optimizer states and kernels exist after this
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train_steps(model, optimizer, resolution, batch, steps, grad_accum)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def probe(model, mode: str, resolution: int, batch: int, base: MemoryModel) -> MemoryModel:
    from training.hardware.probe import probe_coefficients

    block = model.layers[-1]  # never checkpointed here, and a plain (peft-wrapped) main block
    block = block.block if isinstance(block, Checkpointed) else block
    coefficients = probe_coefficients(
        block,
        PRESETS["z-image"],
        micro_batch=batch,
        tokens_per_sample=tokens_per_sample(resolution),
        mode=mode,
        lora_rank=RANK,
    )
    return base.calibrated_from_probe(mode, coefficients, RANK)


def run_configs(model, optimizer, trainable: int, mode: str, args, analytic: MemoryModel) -> list[dict]:
    results, total = [], torch.cuda.get_device_properties(0).total_memory
    for resolution, batch, depth in CONFIGS[:1] if args.quick else CONFIGS:
        row = {"mode": mode, "resolution": resolution, "batch": batch, "depth": depth, "lora_dtype": args.lora_dtype}
        row["analytic_gib"] = predict(analytic, mode, resolution, batch, depth, trainable) / GIB
        calibrated = probe(model, mode, resolution, batch, analytic)
        row["probe_gib"] = predict(calibrated, mode, resolution, batch, depth, trainable) / GIB
        row["probe_coefficients"] = calibrated.calibrated[mode].to_dict()
        if args.probe:
            results.append(report(row, args))
            continue
        if row["probe_gib"] * GIB > 0.95 * total:
            row.update(skipped="predicted over the card", ok=True)
            results.append(report(row, args))
            continue
        set_checkpoint_depth(model, depth)
        try:
            row["measured_gib"] = measure_peak(model, optimizer, resolution, batch) / GIB
        except torch.OutOfMemoryError:
            row.update(measured_gib=None, error="OOM")
        optimizer.zero_grad(set_to_none=True)
        set_checkpoint_depth(model, 0)
        torch.cuda.empty_cache()
        results.append(report(row, args))
    return results


def run_caps(model, optimizer, trainable: int, args, analytic: MemoryModel) -> list[dict]:
    results, total = [], torch.cuda.get_device_properties(0).total_memory
    for cap_gib, resolution in CAPS[:1] if args.quick else CAPS:
        calibrated = probe(model, "lora", resolution, 2, analytic)
        cap = cap_gib * GIB
        row = {"test": "cap", "cap_gib": cap_gib, "resolution": resolution, "lora_dtype": args.lora_dtype}
        try:
            plan = make_plan(
                cap_request(resolution, trainable), capped_profile(cap, calibrated, False), None, calibrated
            )
        except PlanRefused as refusal:
            row.update(error=f"refused: {refusal}", ok=False)
            results.append(report(row, args))
            continue
        print(plan.table())
        row.update(micro_batch=plan.micro_batch, depth=plan.checkpoint_depth, grad_accum=plan.grad_accum)
        row["predicted_gib"] = plan.predicted_peak_bytes / GIB
        set_checkpoint_depth(model, plan.checkpoint_depth)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / total)
        try:
            peak = measure_peak(model, optimizer, resolution, plan.micro_batch, steps=5, grad_accum=plan.grad_accum)
            row.update(measured_gib=peak / GIB, reserved_gib=torch.cuda.max_memory_reserved() / GIB)
            row.update(peak_over_cap=peak / cap, ok=peak / cap >= 0.85)
        except torch.OutOfMemoryError:
            row.update(error="OOM", ok=False)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            optimizer.zero_grad(set_to_none=True)
            set_checkpoint_depth(model, 0)
            torch.cuda.empty_cache()
        results.append(report(row, args))
    return results


def report(row: dict, args) -> dict:
    measured = row.get("measured_gib")
    for key in ("analytic", "probe"):
        if measured and row.get(f"{key}_gib"):
            row[f"{key}_error"] = row[f"{key}_gib"] / measured - 1
    if "test" not in row and measured:
        row["ok"] = abs(row["probe_error"]) <= 0.10
    row["gpu"] = torch.cuda.get_device_name()
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(line + "\n")
    return row


# -------------------------------------------------------------------------------------------------------------
# QLoRA: NF4 storage equal in bytes to bitsandbytes Linear4bit with double quantisation

NF4_LEVELS = [
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1848449, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
]  # fmt: skip
ROWS_PER_CHUNK = 512


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantised on the fly in forward and again in backward (nothing saved but the module)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return torch.nn.functional.linear(x, module.dequantize())

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize(), None


class NF4Linear(torch.nn.Module):
    """4-bit codes (two per byte), one 8-bit absmax code per 64 weights, one fp32 scale per 256 absmax."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.bias = linear.bias  # frozen, bf16 (adaLN only)
        levels = torch.tensor(NF4_LEVELS, device=linear.weight.device)
        self.register_buffer("levels", levels.to(torch.bfloat16))
        codes, absmax = [], []
        for rows in linear.weight.detach().split(ROWS_PER_CHUNK):
            blocks = rows.float().reshape(-1, 64)
            block_max = blocks.abs().amax(1).clamp_min(1e-12)
            index = torch.bucketize(blocks / block_max[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
            codes.append((index[:, 0::2] << 4 | index[:, 1::2]).reshape(-1))
            absmax.append(block_max)
        absmax = torch.cat(absmax)
        absmax = torch.nn.functional.pad(absmax, (0, -absmax.numel() % 256), value=1.0).reshape(-1, 256)
        scale = absmax.amax(1, keepdim=True)
        self.register_buffer("codes", torch.cat(codes))
        codes_8bit = (absmax / scale * 255).round().to(torch.uint8).reshape(-1)
        self.register_buffer("absmax_codes", codes_8bit[: self.out_features * self.in_features // 64])
        self.register_buffer("absmax_scale", scale.reshape(-1))

    def dequantize(self) -> torch.Tensor:
        weight = torch.empty(self.out_features, self.in_features, device=self.codes.device, dtype=torch.bfloat16)
        for start in range(0, self.out_features, ROWS_PER_CHUNK):
            first, count = start * self.in_features, min(ROWS_PER_CHUNK, self.out_features - start) * self.in_features
            packed = self.codes[first // 2 : (first + count) // 2]
            index = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1, 64).long()
            blocks = slice(first // 64, (first + count) // 64)
            absmax = self.absmax_codes[blocks].float() / 255 * self.absmax_scale.repeat_interleave(256)[blocks]
            weight.view(-1)[first : first + count] = (self.levels[index] * absmax[:, None].to(torch.bfloat16)).view(-1)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4Matmul.apply(x, self)
        return out if self.bias is None else out + self.bias


def quantize_block_linears(model) -> int:
    """Swap every frozen ``nn.Linear`` weight of every block (peft's base_layer where LoRA wraps one; adaLN too,
    as ``training.engine.quantize`` does) for NF4Linear. Biases of adaLN stay bf16 inside a small Linear."""
    targets = []
    for block in [*model.noise_refiner, *model.context_refiner, *model.layers]:
        block = block.block if isinstance(block, Checkpointed) else block
        for name, module in list(block.named_modules()):
            if type(module) is torch.nn.Linear and not module.weight.requires_grad:
                parent_name, _, child = name.rpartition(".")
                targets.append((block.get_submodule(parent_name), child))
    for holder, attribute in targets:
        setattr(holder, attribute, NF4Linear(getattr(holder, attribute)))
        torch.cuda.empty_cache()
    return len(targets)


def print_table(results: list[dict]) -> None:
    print("\nmode   res   batch depth  measured  analytic (err)    probe (err)")
    for r in results:
        if "test" in r or r.get("measured_gib") is None:
            continue
        print(
            f"{r['mode']:<6} {r['resolution']:>4} {r['batch']:>5} {r['depth']:>5} {r['measured_gib']:>8.2f}"
            f"  {r['analytic_gib']:>7.2f} ({r['analytic_error']:+.1%})  {r['probe_gib']:>7.2f} ({r['probe_error']:+.1%})"
        )
    for r in results:
        if r.get("test") == "cap" and r.get("measured_gib") is not None:
            print(
                f"cap {r['cap_gib']} GiB at {r['resolution']}px: micro {r['micro_batch']} depth {r['depth']} "
                f"accum {r['grad_accum']}: peak {r['measured_gib']:.2f} GiB = {r['peak_over_cap']:.1%} of the cap, "
                f"predicted {r['predicted_gib']:.2f}"
            )


def run_bench(args) -> list[dict]:
    started = time.time()
    model, trainable, optimizer = build_model(args.lora_dtype)
    count = sum(p.numel() for p in trainable)
    analytic = MemoryModel(lora_param_bytes=4 if args.lora_dtype == "fp32" else 2)
    logger.info("model built in %.0f s, %d trainable LoRA parameters", time.time() - started, count)
    results = run_configs(model, optimizer, count, "lora", args, analytic)
    if not args.skip_caps and not args.probe:
        results += run_caps(model, optimizer, count, args, analytic)
    if not args.skip_qlora:
        logger.info("QLoRA: %d block Linears now NF4 (%.0f s)", quantize_block_linears(model), time.time() - started)
        results += run_configs(model, optimizer, count, "qlora", args, analytic)
    print_table(results)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        raise SystemExit("bench_memory needs a CUDA GPU; use --dry-run to check the planning side on CPU")
    started = time.time()
    results = run_bench(args)
    print(f"\nbench_memory: {len(results)} results in {time.time() - started:.0f} s on {torch.cuda.get_device_name()}")
    return 0 if all(r.get("ok", True) for r in results) else 1


if __name__ == "__main__":
    # Before the first CUDA allocation: segments that grow in place keep fragmentation inside the planner's margin.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    raise SystemExit(main())
