"""The configurations of ``bench_memory`` and their runs through the engine: one ``Trainer`` per configuration
(built from a ``TrainConfig`` on synthetic data, as a user's run is), its measured peak, the probe on its last main
block, and the memory-capped runs of a plan. Predictions and plans also work on the CPU (``--dry-run``)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import tempfile
import time
from dataclasses import dataclass

import torch
from bench_ours import OurConfig, train_config

from training.hardware.discovery import HardwareProfile, discover
from training.hardware.memory import GIB, ActivationCoefficients, MemoryEstimate, MemoryModel, image_tokens_for, padded
from training.hardware.plan import PlanRequest, TrainingPlan, make_plan
from training.hardware.tiers import load_tiers, simulated_profile

logger = logging.getLogger("bench_memory")

CAPTION_TOKENS = 128
RANK = 128
TARGETS = "attention+ffn"  # the planner's and the engine's default preset
CAP_TARGET_GLOBAL_BATCH = 16
CAP_STEPS = 5


@dataclass(kw_only=True, frozen=True)
class Config:
    """One engine run: mode, square resolution, micro-batch, checkpoint depth (first main blocks), accumulation."""

    mode: str
    resolution: int
    batch: int
    depth: int
    grad_accum: int = 1
    compile: bool = False
    targets: str = TARGETS
    caption_tokens: int = CAPTION_TOKENS

    def label(self) -> str:
        accum = f"x{self.grad_accum}" if self.grad_accum > 1 else ""
        compiled = " compiled" if self.compile else ""
        extra = "" if self.targets == TARGETS else f" targets {self.targets}"
        extra += "" if self.caption_tokens == CAPTION_TOKENS else f" {self.caption_tokens} caption tokens"
        return f"{self.mode} {self.resolution}² bs{self.batch}{accum} depth {self.depth}{compiled}{extra}"

    def ours(self) -> OurConfig:
        """This run as a ``bench_ours`` configuration (rank 128 on attention+ffn); ``grad_accum`` goes to its
        ``train_config`` separately."""
        return OurConfig(
            mode=self.mode,
            batch=self.batch,
            resolution=self.resolution,
            caption_tokens=self.caption_tokens,
            rank=RANK,
            targets=self.targets,
            compile=self.compile,
            checkpoint_depth=self.depth,
        )


# 6 per mode: 512² and 1024², depth 0 / half / all; batches chosen so LoRA stays under ~50 GiB on an 80 GB card
# and the activations are a large share of the peak even with every block checkpointed.
SHAPES = [(512, 4, 0), (512, 8, 15), (512, 24, 30), (1024, 1, 0), (1024, 2, 15), (1024, 8, 30)]
CONFIGS = [Config(mode=m, resolution=r, batch=b, depth=d) for m in ("lora", "qlora") for r, b, d in SHAPES]
CAPS = [(24, 512), (40, 1024)]  # GiB the allocator may use, resolution


def tokens_per_sample(resolution: int, caption_tokens: int = CAPTION_TOKENS) -> int:
    return image_tokens_for((resolution, resolution)) + padded(caption_tokens)


def predict(memory_model: MemoryModel, conf: Config, trainable: int | None = None) -> MemoryEstimate:
    return memory_model.predict_peak(
        conf.mode,
        conf.batch,
        image_tokens_for((conf.resolution, conf.resolution)),
        padded(conf.caption_tokens),
        conf.depth,
        1,
        RANK,
        lora_targets=conf.targets,
        grad_accum=conf.grad_accum,
        compiled=conf.compile,
        trainable_params=trainable,
    )


# -------------------------------------------------------------------------------------------------------------
# planning for a memory cap


def cap_request(
    resolution: int, trainable: int | None, *, caption_tokens: int = CAPTION_TOKENS, targets: str = TARGETS
) -> PlanRequest:
    return PlanRequest(
        mode="lora",
        resolution=resolution,
        caption_tokens=caption_tokens,
        lora_rank=RANK,
        lora_targets=targets,
        target_global_batch=CAP_TARGET_GLOBAL_BATCH,
        compile=False,
        trainable_params=trainable,
    )


def capped_profile(cap_bytes: int, memory_model: MemoryModel, *, simulated: bool) -> HardwareProfile:
    """This machine (or the simulated 1x80GB tier) with free memory such that the planner's budget is the cap less
    its margin: ``set_per_process_memory_fraction`` caps the allocator only, the CUDA context lies outside it, and
    the planner subtracts the context from the free memory, so the profile offers cap + context."""
    offered = cap_bytes + memory_model.cuda_context_bytes
    if not simulated:
        return discover(free_bytes_override=offered)
    profile = simulated_profile(load_tiers()["1x80GB"])
    return dataclasses.replace(profile, gpus=(dataclasses.replace(profile.gpus[0], free_bytes=offered),))


def cap_plan(
    cap_gib: int,
    resolution: int,
    memory_model: MemoryModel,
    *,
    simulated: bool,
    trainable=None,
    caption_tokens: int = CAPTION_TOKENS,
    targets: str = TARGETS,
):
    profile = capped_profile(cap_gib * GIB, memory_model, simulated=simulated)
    request = cap_request(resolution, trainable, caption_tokens=caption_tokens, targets=targets)
    return make_plan(request, profile, None, memory_model)


def plan_config(plan: TrainingPlan, *, caption_tokens: int = CAPTION_TOKENS, targets: str = TARGETS) -> Config:
    return Config(
        targets=targets,
        caption_tokens=caption_tokens,
        mode=plan.mode,
        resolution=plan.resolution[0],
        batch=plan.micro_batch,
        depth=plan.checkpoint_depth,
        grad_accum=plan.grad_accum,
        compile=plan.compile,
    )


# -------------------------------------------------------------------------------------------------------------
# GPU: one Trainer per configuration


def free_cuda() -> int:
    """Collect garbage, return cached blocks to the driver; the bytes still allocated (should be ~0)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def engine_run(conf: Config, *, warmup: int, steps: int, probe: bool, cap_bytes: int | None = None) -> dict:
    """Build the engine's Trainer for ``conf``, run ``warmup`` + ``steps`` ``train_step()``s and return the peak
    ``max_memory_allocated`` of the measured steps (above what was allocated before the build), timings and, with
    ``probe``, the probe's coefficients on the last main block. ``cap_bytes`` caps the allocator for the whole run.
    Everything is freed (trainer, process group, cache) before it returns; an OOM is reported, not raised."""
    from training.engine.distributed import init_distributed, shutdown_distributed
    from training.engine.trainer import Trainer
    from training.run.events import RunLog

    result: dict = {"leftover_gib": free_cuda() / GIB}
    total = torch.cuda.get_device_properties(0).total_memory
    with tempfile.TemporaryDirectory(prefix="whetstone-bench-memory-") as run_dir:
        dist_info = init_distributed(timeout_s=600)
        log = RunLog(run_dir, rank=0)
        trainer = None
        try:
            if cap_bytes:
                torch.cuda.set_per_process_memory_fraction(cap_bytes / total)
            baseline = torch.cuda.memory_allocated()
            started = time.perf_counter()
            config = train_config(conf.ours(), run_dir, warmup + steps, grad_accum=conf.grad_accum)
            trainer = Trainer.build(config, dist_info, log)
            torch.cuda.synchronize()
            result["build_s"] = time.perf_counter() - started
            result["trainable_params"] = sum(p.numel() for p in trainer.params)
            result.update(_measured_steps(trainer, warmup, steps, baseline))
            if probe:
                result["coefficients"] = _probe(trainer, conf).to_dict()
        except torch.OutOfMemoryError as error:
            result["error"] = "OOM: " + str(error).splitlines()[0][:200]
        finally:
            trainer = None
            log.close()
            shutdown_distributed()
            torch.cuda.set_per_process_memory_fraction(1.0)
    free_cuda()
    return result


def _measured_steps(trainer, warmup: int, steps: int, baseline: int) -> dict:
    started = time.perf_counter()
    for _ in range(warmup):  # optimizer states, cuBLAS workspaces and kernels exist after this
        trainer.train_step()
    torch.cuda.synchronize()
    warm = time.perf_counter()
    torch.cuda.reset_peak_memory_stats()
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    torch.cuda.synchronize()
    done = time.perf_counter()
    return {
        "measured_gib": (torch.cuda.max_memory_allocated() - baseline) / GIB,
        "reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "warmup_s": warm - started,
        "step_s": (done - warm) / steps,
        "loss": losses[-1],
    }


def _probe(trainer, conf: Config) -> ActivationCoefficients:
    from training.engine.parallelize import unwrap
    from training.hardware.probe import probe_coefficients

    model = unwrap(trainer.model)
    return probe_coefficients(
        model.layers[-1],  # peft-wrapped (NF4 for QLoRA) main block; unwrapped if checkpointed
        model.config,
        micro_batch=conf.batch,
        tokens_per_sample=tokens_per_sample(conf.resolution, conf.caption_tokens),
        mode=conf.mode,
        lora_rank=RANK,
    )


def calibrated_model(analytic: MemoryModel, mode: str, coefficients: dict) -> MemoryModel:
    return analytic.calibrated_from_probe(mode, ActivationCoefficients(**coefficients), RANK)
