"""What a finished (or stopped) run reports in its summary: result files, images per second over the last steps,
data wait, peak memory and the config it ran."""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING

import torch

from .config import TrainConfig
from .distributed import DistInfo
from .ema import ema_path
from .shapes import shape_summary

if TYPE_CHECKING:
    from .trainer import Trainer


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA memory allocated by this process, or the peak resident memory of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_summary(config: TrainConfig, dist_info: DistInfo, trainer: Trainer, state: str, wall_s: float) -> dict:
    """The run's ``summary.json`` record (``RunLog.summary``): its result files, speed over the last steps, peak memory."""
    return {
        "state": state,
        "mode": config.mode,
        "steps": trainer.step,
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
        "lora_file": str(config.run.lora_file) if trainer.lora is not None else None,
        "model_file": str(config.run.model_file) if trainer.lora is None else None,
        "ema_file": _ema_file(config, trainer),
        "wall_s": wall_s,
        "peak_mem_gb": peak_memory_gb(dist_info.device),
        "final_loss": trainer.history[-1]["loss"] if trainer.history else None,
        # over the last (up to 1000) steps; the first step compiles and warms up: left out when there are others
        "img_per_s": _window_rate(list(trainer.history)[1:] or list(trainer.history)),
        "data_wait": _mean([m["data_wait"] for m in list(trainer.history)[1:] or trainer.history]),
        "config": config.to_dict(),
    } | (shape_summary(list(trainer.history)) if config.resolutions.active else {})


def _ema_file(config: TrainConfig, trainer: Trainer) -> str | None:
    if trainer.ema is None:
        return None
    return str(ema_path(config.run.lora_file if trainer.lora is not None else config.run.model_file))


def _window_rate(history: list[dict]) -> float | None:
    """Images per second over a window of steps: all its images over all its (chained, device-finished) seconds."""
    seconds = sum(m["step_s"] for m in history)
    return sum(m["img_per_s"] * m["step_s"] for m in history) / seconds if seconds > 0 else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
