"""A tier workflow's template thumbnail: ``<template name>.jpg`` beside the ``.json``, as ComfyUI's template browser
reads it for a custom node pack (``/api/workflow_templates/<pack>/<name>.jpg``).

It shows the tier, what the workflow trains and the plan's key numbers over a map of the workflow's own nodes (their
real positions and sizes), so each template is recognisable without opening it.
"""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

SIZE = (512, 384)
BACKGROUND = (24, 24, 27)
OURS = (251, 146, 60)  # the chart's orange: our nodes
CORE = (82, 82, 91)
NOTE = (63, 63, 70)
TEXT = (244, 244, 245)
MUTED = (161, 161, 170)
MAP_BOX = (16, 150, 496, 368)


def _map(draw: ImageDraw.ImageDraw, workflow: dict) -> None:
    nodes = workflow["nodes"]
    left = min(n["pos"][0] for n in nodes)
    top = min(n["pos"][1] - 30 for n in nodes)
    right = max(n["pos"][0] + n["size"][0] for n in nodes)
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes)
    x0, y0, x1, y1 = MAP_BOX
    scale = min((x1 - x0) / (right - left), (y1 - y0) / (bottom - top))
    for node in nodes:
        (x, y), (w, h) = node["pos"], node["size"]
        box = (
            x0 + (x - left) * scale,
            y0 + (y - 30 - top) * scale,
            x0 + (x + w - left) * scale,
            y0 + (y + h - top) * scale,
        )
        ours = node.get("properties", {}).get("cnr_id") == "comfyui-whetstone"
        colour = OURS if ours else NOTE if node["type"] in ("Note", "MarkdownNote") else CORE
        draw.rounded_rectangle(box, radius=3, fill=colour)


def thumbnail(workflow: dict, title: str, lines: list[str]) -> bytes:
    """The JPEG bytes: ``title`` large, ``lines`` below it, then the node map."""
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((16, 12), "Whetstone", font=ImageFont.load_default(size=18), fill=OURS)
    draw.text((16, 36), title, font=ImageFont.load_default(size=30), fill=TEXT)
    small = ImageFont.load_default(size=15)
    for index, line in enumerate(lines[:4]):
        draw.text((16, 76 + 18 * index), line, font=small, fill=MUTED)
    _map(draw, workflow)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85, optimize=True)
    return buffer.getvalue()
