"""A one-image training report drawn with PIL only: the loss curve (raw and smoothed) on top; loss by σ bucket,
throughput and memory below. Used by the demo and by ComfyUI's Training Report node (which turns it into an IMAGE)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_write

BACKGROUND = (255, 255, 255)
INK = (40, 40, 40)
GRID = (228, 228, 228)
RAW = (160, 190, 230)
SMOOTH = (20, 80, 180)
ACCENT = (200, 90, 30)
MUTED = (120, 120, 120)


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with TensorBoard's start-up debiasing (the first values are not pulled to 0)."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight!r}")
    out, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def loss_series(events: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the events that carry a finite loss."""
    pairs = [(e["step"], float(e["loss"])) for e in events if _finite(e.get("loss"))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def render_report(
    events: list[dict[str, Any]],
    path: str | os.PathLike | None = None,
    size: tuple[int, int] = (800, 500),
    smoothing: float = 0.9,
) -> Image.Image:
    """Draw the report; also save it as PNG to ``path`` when given. ``smoothing``: the EMA weight of the smoothed
    loss (``smooth``)."""
    width, height = size
    if width < 320 or height < 240:
        raise ValueError(f"report size must be at least 320x240, got {width}x{height}")
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(max(10, height // 42))
    steps, losses = loss_series(events)
    draw.text((12, 8), _headline(events, losses), fill=INK, font=font)
    top, split = 32, int(height * 0.62)
    if not losses:
        draw.text((width // 2 - 60, height // 2), "no steps logged yet", fill=MUTED, font=font)
    else:
        _line_panel(
            draw, (8, top, width - 8, split), font, "loss", steps, [(losses, RAW), (smooth(losses, smoothing), SMOOTH)]
        )
    third = (width - 16) // 3
    boxes = [(8 + i * third, split + 8, 8 + (i + 1) * third - 6, height - 8) for i in range(3)]
    _sigma_panel(draw, boxes[0], font, events)
    _metric_panel(draw, boxes[1], font, events, "img_per_s", "images / s")
    memory_key = "peak_mem_gb" if any(_finite(e.get("peak_mem_gb")) for e in events) else "gpu_mem_used_gb"
    _metric_panel(draw, boxes[2], font, events, memory_key, "peak memory (GiB)")
    if path is not None:
        atomic_write(path, lambda file: image.save(file, format="PNG"))
    return image


# ---------------------------------------------------------------------------- panels


def _headline(events: list[dict[str, Any]], losses: list[float]) -> str:
    if not losses:
        return "Whetstone training report"
    smoothed = smooth(losses)
    parts = [f"{events[-1]['step']} steps", f"loss {smoothed[0]:.4g} -> {smoothed[-1]:.4g} (smoothed)"]
    rates = [e["img_per_s"] for e in events[1:] if _finite(e.get("img_per_s"))]
    if rates:
        parts.append(f"{sum(rates) / len(rates):.3g} img/s")
    if events and _finite(events[-1].get("elapsed_s")):
        parts.append(f"{events[-1]['elapsed_s']:.0f} s")
    return "Whetstone training report  |  " + "  |  ".join(parts)


def _line_panel(draw, box, font, title: str, xs: list[int], series: list[tuple[list[float], tuple]]) -> None:
    left, top, right, bottom = box
    ys = [y for values, _ in series for y in values]
    low, high = _range(ys)
    plot = (left + 52, top + 24, right - 8, bottom - 18)
    _frame(draw, box, plot, font, title)
    x_low, x_high = (xs[0], xs[-1]) if xs[-1] > xs[0] else (xs[0] - 1, xs[0] + 1)
    for fraction in (0.0, 0.5, 1.0):
        y = plot[3] - fraction * (plot[3] - plot[1])
        draw.line((plot[0], y, plot[2], y), fill=GRID)
        draw.text((left + 2, y - 6), _number(low + fraction * (high - low)), fill=MUTED, font=font)
    draw.text((plot[0], plot[3] + 3), str(x_low), fill=MUTED, font=font)
    draw.text((plot[2] - 8 * len(str(x_high)), plot[3] + 3), str(x_high), fill=MUTED, font=font)
    for values, colour in series:
        points = [
            (
                plot[0] + (x - x_low) / (x_high - x_low) * (plot[2] - plot[0]),
                plot[3] - (y - low) / (high - low) * (plot[3] - plot[1]),
            )
            for x, y in zip(xs, values)
        ]
        if len(points) == 1:
            draw.ellipse((points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour)
        else:
            draw.line(points, fill=colour, width=2 if colour == SMOOTH else 1)


def _metric_panel(draw, box, font, events: list[dict[str, Any]], key: str, title: str) -> None:
    pairs = [(e["step"], float(e[key])) for e in events if _finite(e.get(key))]
    if not pairs:
        _frame(draw, box, None, font, f"{title}: not logged")
        return
    xs, ys = [s for s, _ in pairs], [v for _, v in pairs]
    _line_panel(draw, box, font, f"{title}  (last {_number(ys[-1])})", xs, [(ys, ACCENT)])


def _sigma_panel(draw, box, font, events: list[dict[str, Any]]) -> None:
    """Mean loss per σ bucket over the last quarter of the run (where the curve has settled)."""
    recent = events[-max(1, len(events) // 4) :]
    sums: dict[str, list[float]] = {}
    for event in recent:
        for name, value in (event.get("loss_sigma") or {}).items():
            values = sums.setdefault(name, [])  # the loop's bucket order, also for buckets empty at first
            if _finite(value):
                values.append(float(value))
    sums = {name: values for name, values in sums.items() if values}
    if not sums:
        _frame(draw, box, None, font, "loss by sigma: not logged")
        return
    names = list(sums)
    means = [sum(v) / len(v) for v in sums.values()]
    left, top, right, bottom = box
    plot = (left + 8, top + 24, right - 8, bottom - 18)
    _frame(draw, box, plot, font, "loss by sigma (last 25%)")
    high = max(means) or 1.0
    slot = (plot[2] - plot[0]) / len(names)
    for index, (name, mean) in enumerate(zip(names, means)):
        x0 = plot[0] + index * slot + slot * 0.15
        y0 = plot[3] - mean / high * (plot[3] - plot[1] - 12)
        draw.rectangle((x0, y0, x0 + slot * 0.7, plot[3]), fill=SMOOTH)
        draw.text((x0, y0 - 12), _number(mean), fill=INK, font=font)
        draw.text((x0, plot[3] + 3), name[:9], fill=MUTED, font=font)


def _frame(draw, box, plot, font, title: str) -> None:
    draw.rectangle(box, outline=GRID)
    draw.text((box[0] + 6, box[1] + 2), title, fill=INK, font=font)
    if plot is not None:
        draw.line((plot[0], plot[1], plot[0], plot[3], plot[2], plot[3]), fill=MUTED)


# ---------------------------------------------------------------------------- helpers


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:
        pad = abs(high) * 0.05 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return (low - pad if low - pad >= 0 or low < 0 else 0.0), high + pad  # no negative axis for counts and rates


def _number(value: float) -> str:
    return f"{value:.3g}"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()
