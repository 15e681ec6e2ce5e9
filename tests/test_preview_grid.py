"""The Training Report's preview grid (`preview_grid`) of an untrusted run folder: an event's width or height that is
not a whole number of pixels (a string, 0, a 400-digit integer) and a PNG that is no image or is huge leave a square
cell or a blank one; they raised TypeError, ZeroDivisionError or OverflowError out of the report, or loaded a
25-megapixel image for a 192-pixel cell."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from training.engine.preview_images import GRID_CELL, HEADER_HEIGHT, LABEL_WIDTH, image_path, preview_grid


def run_with(tmp_path, events: list[dict], pngs: dict[tuple[int, int], Image.Image | bytes]):
    (tmp_path / "previews").mkdir()
    lines = []
    for event in events:
        event = {"file": f"step_{event['step']:07d}.safetensors", "prompts": ["a"], **event}
        (tmp_path / "previews" / event["file"]).write_bytes(b"latents")
        lines.append(json.dumps(event))
    (tmp_path / "previews.jsonl").write_text("\n".join(lines) + "\n")
    for (step, prompt), png in pngs.items():
        if isinstance(png, bytes):
            image_path(tmp_path, step, prompt).write_bytes(png)
        else:
            png.save(image_path(tmp_path, step, prompt), format="PNG")
    return tmp_path


RED = Image.new("RGB", (64, 32), (255, 0, 0))


@pytest.mark.parametrize("width", ["abc", 0, -5, 10**400, True, 1e300, None])
def test_a_width_that_is_not_pixels_draws_square_cells(tmp_path, width):
    run = run_with(tmp_path, [{"step": 0, "width": width, "height": width}], {(0, 0): RED})
    grid = preview_grid(run)
    assert grid.size == (LABEL_WIDTH + GRID_CELL, HEADER_HEIGHT + GRID_CELL)
    assert grid.getpixel((LABEL_WIDTH + 10, HEADER_HEIGHT + 10)) == (255, 0, 0)


def test_the_events_size_shapes_the_cells(tmp_path):
    run = run_with(tmp_path, [{"step": 0, "width": 64, "height": 32}], {(0, 0): RED})
    assert preview_grid(run).size == (LABEL_WIDTH + GRID_CELL, HEADER_HEIGHT + GRID_CELL // 2)


def test_a_png_that_is_no_image_or_huge_leaves_its_cell_blank(tmp_path, caplog):
    huge = Image.new("RGB", (5000, 5000), (0, 0, 255))  # 25 Mpx: a few KB as a PNG
    run = run_with(
        tmp_path,
        [{"step": 0, "width": 64, "height": 64, "prompts": ["a", "b", "c"]}],
        {(0, 0): b"\x89PNG\r\n\x1a\nnot really", (0, 1): huge, (0, 2): RED},
    )
    grid = np.asarray(preview_grid(run))
    cells = [grid[HEADER_HEIGHT + 50, LABEL_WIDTH + i * GRID_CELL + 50].tolist() for i in range(3)]
    assert cells == [[255, 255, 255], [255, 255, 255], [255, 0, 0]]
    assert "not a preview image" in caplog.text and "left out of the grid" in caplog.text
