"""Training Report: a run's events drawn as an IMAGE (loss, σ-bucket losses, throughput, memory, learning rate)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..training.engine.events import read_events
from . import paths
from .chart import Panel, Series, image_to_comfy, moving_average, render_panels
from .run_process import SUMMARY_FILE, read_json_file
from .validation import Int, Text, check_all, declare
from .values import RUN_TYPE

logger = logging.getLogger(__name__)

WIDGETS = {
    "run_name": Text(
        "", "A run in the whetstone_runs folder, used when no run is linked (e.g. to chart an earlier run).", 64
    ),
    "smoothing": Int(20, 1, 10_000, "Steps in the moving average drawn over the raw loss."),
}


def report_panels(events: list[dict], smoothing: int) -> list[Panel]:
    steps = [e["step"] for e in events]
    losses = [e.get("loss") for e in events]
    panels = [
        Panel(
            "loss",
            (Series("loss", steps, losses), Series(f"mean of {smoothing}", steps, moving_average(losses, smoothing))),
            log_y=True,
        )
    ]
    buckets = sorted({label for e in events for label in (e.get("loss_sigma") or {})})
    if buckets:
        sigma_series = tuple(
            Series(
                f"σ {label}",
                steps,
                moving_average([(e.get("loss_sigma") or {}).get(label) for e in events], smoothing),
            )
            for label in buckets
        )
        panels.append(Panel("loss by σ bucket (moving average)", sigma_series, log_y=True))
    panels.append(Panel("images / s", (Series("img/s", steps, [e.get("img_per_s") for e in events]),)))
    memory_key = next((k for k in ("peak_mem_gb", "gpu_mem_used_gb") if any(k in e for e in events)), "peak_mem_gb")
    panels.append(Panel("memory (GB)", (Series(memory_key, steps, [e.get(memory_key) for e in events]),)))
    panels.append(Panel("learning rate", (Series("lr", steps, [e.get("lr") for e in events]),)))
    return panels


def summarize_run(run_dir: Path, events: list[dict]) -> str:
    summary = read_json_file(run_dir / SUMMARY_FILE) or {}
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
        "Draws a training run as an image for Preview Image or Save Image: the loss with its moving average, loss "
        "per noise-level (σ) bucket, images per second, memory and learning rate, plus a text summary."
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
        image = render_panels(report_panels(events, values["smoothing"]))
        return (image_to_comfy(image), summarize_run(run_dir, events))
