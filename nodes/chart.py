"""Drawing run metrics into an image with Pillow (no plotting library): line charts in a grid of panels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 27)
AXIS = (110, 110, 120)
TEXT = (220, 220, 225)
COLOURS = ((96, 165, 250), (251, 146, 60), (74, 222, 128), (244, 114, 182), (250, 204, 21), (167, 139, 250))
MARGIN = (56, 28, 16, 30)  # left, top, right, bottom


@dataclass(frozen=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    log_y: bool = False


def _finite_points(series: Series, log_y: bool) -> list[tuple[float, float]]:
    points = []
    for x, y in zip(series.xs, series.ys):
        if y is None or not math.isfinite(y) or (log_y and y <= 0):
            continue
        points.append((float(x), math.log10(y) if log_y else float(y)))
    return points


def _ranges(all_points: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    xs = [p[0] for p in all_points]
    ys = [p[1] for p in all_points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    return x0, x1, y0, y1


def _draw_panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], panel: Panel, font) -> None:
    left, top, right, bottom = box
    draw.text((left + 4, top + 4), panel.title, fill=TEXT, font=font)
    plot = (left + MARGIN[0], top + MARGIN[1], right - MARGIN[2], bottom - MARGIN[3])
    draw.rectangle(plot, outline=AXIS)
    series_points = [(s, _finite_points(s, panel.log_y)) for s in panel.series]
    every = [p for _, pts in series_points for p in pts]
    if not every:
        draw.text((plot[0] + 8, plot[1] + 8), "no data yet", fill=AXIS, font=font)
        return
    x0, x1, y0, y1 = _ranges(every)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        px = plot[0] + (x - x0) / (x1 - x0) * (plot[2] - plot[0])
        py = plot[3] - (y - y0) / (y1 - y0) * (plot[3] - plot[1])
        return px, py

    def label(value: float) -> str:
        return f"{10**value:.3g}" if panel.log_y else f"{value:.3g}"

    draw.text((left + 2, plot[1] - 2), label(y1), fill=AXIS, font=font)
    draw.text((left + 2, plot[3] - 10), label(y0), fill=AXIS, font=font)
    draw.text((plot[0], plot[3] + 4), f"{x0:g}", fill=AXIS, font=font)
    draw.text((plot[2] - 40, plot[3] + 4), f"{x1:g}", fill=AXIS, font=font)
    for index, (series, points) in enumerate(series_points):
        colour = COLOURS[index % len(COLOURS)]
        pixels = [to_pixel(x, y) for x, y in points]
        if len(pixels) == 1:
            draw.ellipse((pixels[0][0] - 2, pixels[0][1] - 2, pixels[0][0] + 2, pixels[0][1] + 2), fill=colour)
        elif pixels:
            draw.line(pixels, fill=colour, width=2)
        draw.text((plot[0] + 6 + 110 * index, plot[1] + 4), series.label, fill=colour, font=font)


def render_panels(
    panels: Sequence[Panel], *, width: int = 1024, panel_height: int = 256, columns: int = 2
) -> Image.Image:
    """Panels laid out in a grid, `columns` wide."""
    if not panels:
        raise ValueError("render_panels needs at least one panel")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    image = Image.new("RGB", (width, rows * panel_height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    panel_width = width // columns
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        box = (column * panel_width, row * panel_height, (column + 1) * panel_width - 1, (row + 1) * panel_height - 1)
        _draw_panel(draw, box, panel, font)
    return image


def image_to_comfy(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> ComfyUI IMAGE [1, H, W, 3] float32 in 0..1."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]


def moving_average(values: Sequence[float | None], window: int) -> list[float | None]:
    """Trailing mean over the last `window` finite values (None where there is none yet)."""
    out: list[float | None] = []
    recent: list[float] = []
    for value in values:
        if value is not None and math.isfinite(value):
            recent.append(value)
            if len(recent) > window:
                recent.pop(0)
        out.append(sum(recent) / len(recent) if recent else None)
    return out
