"""Training Report: a run's events drawn as an IMAGE by the engine's report (loss, σ buckets, throughput, memory)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..training.engine.preview_images import preview_grid
from ..training.engine.report import render_report
from ..training.run.events import read_events, read_summary
from . import paths, preview_jobs
from .validation import Int, Text, check_all, declare
from .values import RUN_TYPE

logger = logging.getLogger(__name__)

GRID_ROWS = 8  # the newest preview steps drawn

WIDGETS = {
    "run_name": Text(
        "", "A run in the whetstone_runs folder, used when no run is linked (e.g. to chart an earlier run).", 64
    ),
    "smoothing": Int(20, 1, 10_000, "Steps the smoothed loss curve averages over (an EMA of that span)."),
}


def ema_weight(window: int) -> float:
    """The exponential moving average that weighs recent steps like a ``window``-step mean (span 2/(N+1))."""
    return 1.0 - 2.0 / (window + 1)


def report_image(events: list[dict], window: int, run_dir: Path | None = None) -> torch.Tensor:
    """The engine's run report (loss, σ buckets, throughput, memory) as a ComfyUI IMAGE [1, H, W, 3] in 0..1, with
    the run's decoded previews below it as a grid (a row per preview step, a column per prompt) when it has any."""
    image = render_report(events, size=(1000, 620), smoothing=ema_weight(window))
    grid = preview_grid(run_dir, max_rows=GRID_ROWS) if run_dir is not None else None
    if grid is not None:
        combined = Image.new("RGB", (max(image.width, grid.width), image.height + grid.height), (255, 255, 255))
        combined.paste(image.convert("RGB"), (0, 0))
        combined.paste(grid, (0, image.height))
        image = combined
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def summarize_run(run_dir: Path, events: list[dict]) -> str:
    summary = read_summary(run_dir) or {}
    lines = [
        f"Run {run_dir.name}: {len(events)} steps logged" + (f", last step {events[-1]['step']}" if events else "")
    ]
    if events:
        last = events[-1]
        lines.append(
            "last: " + ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "img_per_s", "peak_mem_gb", "lr") if k in last)
        )
    lines.extend(f"{key}: {value}" for key, value in sorted(summary.items()) if not isinstance(value, dict | list))
    return "\n".join(lines)


class TrainingReport:
    DESCRIPTION = (
        "Draws a training run as an image for Preview Image or Save Image: the loss with its smoothed curve, loss "
        "per noise-level (σ) bucket, images per second and memory, the grid of the previews below (when the run "
        "made previews: a row per preview step, a column per prompt), plus a text summary."
    )
    CATEGORY = "Whetstone"
    FUNCTION = "report"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("chart", "summary")
    OUTPUT_TOOLTIPS = ("The charts as an image (connect Preview Image or Save Image).", "The run's summary as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": declare(WIDGETS),
            "optional": {"run": (RUN_TYPE, {"tooltip": "A run from Train; replaces run_name."})},
        }

    @classmethod
    def IS_CHANGED(cls, **_inputs):
        return float("nan")  # a run's events grow while it trains: always redraw

    def report(self, run=None, **settings):
        values = check_all(WIDGETS, settings)
        if run is not None:
            run_dir = paths.confine(str(run.run_dir), paths.run_roots(), "run", must_exist=True)
        else:
            name = paths.check_name(values["run_name"], "run_name")
            run_dir = paths.confine(name, paths.run_roots(), "run_name", must_exist=True)
        events = read_events(run_dir)
        problems = preview_jobs.decode_missing(run_dir, GRID_ROWS)  # a background run no node or panel decoded
        image = report_image(events, values["smoothing"], run_dir)
        return (image, "\n".join([summarize_run(run_dir, events), *problems]))
