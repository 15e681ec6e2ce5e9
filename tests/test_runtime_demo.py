"""The README's main command, as a user runs it: python -m training demo (CPU, well under 3 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from training.apps.demo import DemoSettings, make_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "training", "demo", "--output", str(out), "--steps", "60"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.monotonic() - started < 180
    summary = json.loads((out / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"] and summary["steps"] == 60
    assert summary["lora_check"]["modules"] == 10 and summary["lora_check"]["output_change"] > 0
    assert Image.open(out / "loss.png").size == (800, 500)
    assert (out / "demo-lora.safetensors").is_file()
    assert json.loads((out / "run/status.json").read_text())["state"] == "completed"
    assert "Whetstone demo finished" in result.stdout and str(out / "loss.png") in result.stdout


def test_images_are_deterministic(tmp_path):
    first, second = make_images(tmp_path / "a", count=5, size=48), make_images(tmp_path / "b", count=5, size=48)
    for name in ("000.png", "004.png", "004.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "001.txt").read_text() == "a red circle on a black background\n"


def test_settings_validate():
    with pytest.raises(ValueError, match="demo steps must be in 10..10000"):
        DemoSettings(steps=3)
