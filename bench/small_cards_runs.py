"""The runs of ``bench_small_cards``: the random-init model built once, one capped or uncapped run of a plan's config,
and the checks around it (what the allocator and the rest of the process hold before a run).

Imported by ``bench_small_cards.py`` (the cases, the verdicts, the command line); nothing here reads the command line.
"""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import time

import torch

from training.engine.config import TrainConfig
from training.hardware.memory import GIB, MemoryModel
from training.hardware.plan import TrainingPlan
from training.model.config import ZImageConfig

OTHER_LIMIT = 2 * GIB  # device memory this process holds outside its allocator (CUDA context, cuBLAS, NCCL)
LEFTOVER_LIMIT = 256 * 2**20  # allocated between runs: cuBLAS workspaces stay, a run's tensors must not


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
        free_device()
        self.build_s = time.perf_counter() - started
        self.fingerprint = weights_fingerprint(self.state)
        print(f"master model: {model_config.total_params() / 1e9:.2f} B parameters in {self.build_s:.1f} s", flush=True)

    def model(self):
        from training.model.zimage import ZImageTransformer

        with torch.device("meta"):
            model = ZImageTransformer(self.config)
        model.load_state_dict(self.state, strict=True, assign=True)
        return model


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, shape and first and last MiB: two processes that build the "same" random
    model prove they did (a different seed or init order changes every byte) without hashing 12 GB."""
    digest = hashlib.sha256()
    for name in sorted(state):
        raw = state[name].contiguous().view(-1).view(torch.uint8)
        digest.update(f"{name}{tuple(state[name].shape)}".encode())
        digest.update(raw[: 2**20].numpy().tobytes())
        digest.update(raw[-(2**20) :].numpy().tobytes())
    return digest.hexdigest()


def free_device() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------------------
# one run


def process_device_bytes(pid: int) -> int | None:
    """What ``nvidia-smi`` says process ``pid`` holds on the GPU, or None where it cannot say (no nvidia-smi, or a
    container whose process ids it does not see)."""
    command = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1]) * 2**20
    return None


def device_check(device: torch.device, *, alone: bool = True) -> dict:
    """Next to nothing allocated by this process (cuBLAS workspaces) and, on a GPU this process has alone, nothing
    held outside its allocator beyond ``OTHER_LIMIT`` (the CUDA context; another process would show here): the cap
    bounds the allocator only. Not alone (the reference half of ``--parallel``, uncapped), it is recorded only."""
    if device.type != "cuda":
        return {"other_gib": 0.0}
    free_device()
    allocated = torch.cuda.memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    free, total = torch.cuda.mem_get_info(device)
    if allocated > LEFTOVER_LIMIT:
        raise RuntimeError(f"{allocated / GIB:.2f} GiB still allocated before a run: the previous run leaked")
    other = total - free - reserved
    if alone and other > OTHER_LIMIT:
        raise RuntimeError(f"{other / GIB:.1f} GiB of the GPU is held outside this allocator: another process runs")
    row = {"other_gib": other / GIB, "alone": alone, "leftover_gib": allocated / GIB, "total_gib": total / GIB}
    own = process_device_bytes(os.getpid())
    if own is not None:
        row["own_outside_allocator_gib"] = (own - reserved) / GIB
    return row


def run(
    label: str,
    config: TrainConfig,
    master: Master,
    device: torch.device,
    cap_bytes: int | None,
    warmup: int,
    probe_plan: TrainingPlan | None = None,
    alone: bool = True,
    on_checked=None,
) -> dict:
    """Build a Trainer on ``master``'s weights and run ``config.run.steps`` steps; an OOM is recorded, not raised."""
    from training.engine.block_swap import block_swap_of
    from training.engine.distributed import init_distributed, shutdown_distributed
    from training.engine.parallelize import unwrap
    from training.engine.trainer import Trainer
    from training.run.events import RunLog

    row: dict = {
        "run": label,
        "cap_gib": None if cap_bytes is None else cap_bytes / GIB,
        **device_check(device, alone=alone),
    }
    if on_checked is not None:
        on_checked()
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
        free_device()
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
