"""bench/recipe_experiment.py (the lead runs it on the GPU) still runs: its CPU smoke mode, one recipe, and its
KSampler σ schedule is ComfyUI's simple schedule over the shifted table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_simple_schedule_takes_evenly_spaced_entries_of_the_shifted_table():
    from recipe_experiment import comfy_simple_sigmas

    sigmas = comfy_simple_sigmas(4, 3.0).tolist()
    table = [3 * t / (1 + 2 * t) for t in (1.0, 0.75, 0.5, 0.25)]  # entries 1000, 750, 500, 250 of 1000
    assert sigmas == pytest.approx([*table, 0.0])


def test_cpu_smoke_run_writes_its_report(tmp_path):
    out = tmp_path / "r.json"
    command = [sys.executable, "bench/recipe_experiment.py", "--cpu-smoke", "--recipes", "uniform", "--out", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"uniform"} and report["preview"]["shift"] == 3.0
    assert report["results"]["uniform"]["eval_mse"] > 0
