"""render_report draws a PNG from step events (PIL only), including partial and empty runs."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from training.engine.report import render_report, smooth


def _events(n: int) -> list[dict]:
    return [
        {
            "step": s,
            "loss": 0.5 + 0.5 * math.exp(-s / 20) + 0.05 * math.sin(s),
            "loss_sigma": {"0.00-0.25": 0.3, "0.25-0.50": 0.5, "0.50-0.75": 0.7, "0.75-1.00": None},
            "img_per_s": 3.0 + (s % 3) * 0.1,
            "peak_mem_gb": 0.4 + s / 1000,
            "elapsed_s": s * 0.5,
        }
        for s in range(1, n + 1)
    ]


def test_renders_full_report_to_png(tmp_path):
    path = tmp_path / "out/report.png"
    image = render_report(_events(60), path)
    assert image.size == (800, 500) and image.mode == "RGB"
    reloaded = Image.open(path)
    assert reloaded.size == (800, 500)
    assert len(set(image.getdata())) > 8  # something was drawn: curves, bars, text


@pytest.mark.parametrize("events", [[], _events(1), [{"step": 1, "loss": None}], [{"step": 3, "loss": 1.0}] * 3])
def test_renders_degenerate_runs(events):
    assert render_report(events, size=(400, 300)).size == (400, 300)


def test_smooth_is_debiased():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="smoothing weight"):
        smooth([1.0], weight=1.0)


def test_smoothing_weight_changes_only_the_smoothed_curve():
    events = _events(40)
    light, heavy = render_report(events, smoothing=0.0), render_report(events, smoothing=0.95)
    assert light.size == heavy.size and light.tobytes() != heavy.tobytes()
    with pytest.raises(ValueError, match="smoothing"):
        render_report(events, smoothing=1.0)
