"""bench/bench_small_cards.py (the lead runs it on the GPU) still runs: its CPU smoke mode with the capped run and the
reference in two processes at once, and the verdict's rules (loss gap over the shorter reference, identical models)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_loss_gap_is_taken_over_the_steps_both_runs_made():
    from bench_small_cards import loss_gap

    assert loss_gap([1.0, 2.0, 9.0], [1.0, 1.0]) == pytest.approx(1 / 2)
    assert loss_gap([2.0, 2.0], [2.0, 2.0]) == 0.0


def test_fingerprint_tells_two_random_models_apart():
    from small_cards_runs import weights_fingerprint

    state = {"a": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).bfloat16(), "b": torch.zeros(4)}
    same = {name: tensor.clone() for name, tensor in state.items()}
    other = {**same, "a": same["a"].clone()}
    other["a"][2, 4] += 1
    assert weights_fingerprint(state) == weights_fingerprint(same)
    assert weights_fingerprint(state) != weights_fingerprint(other)


def _row(**extra):
    run = {"losses": [1.0, 1.0], "img_per_s": 1.0, "peak_gib": 1.0, "reserved_gib": 1.0}
    row = {"predicted_gib": 1.0, "predicted_swap_bytes_per_step": 0, "capped": dict(run), "reference": dict(run)}
    return {**row, **extra}


def test_verdict_fails_a_missing_half_and_different_models():
    from bench_small_cards import verdict

    args = argparse.Namespace(max_error=0.05, loss_tolerance=0.02)
    assert verdict(_row(), 2**31, args)["ok"]
    assert verdict(_row(reference=None), 2**31, args)["problems"] == ["reference did not run"]
    mismatch = verdict(_row(model_mismatch={"capped": "a", "reference": "b"}), 2**31, args)
    assert not mismatch["ok"] and "different random models" in mismatch["problems"][0]


def test_parallel_smoke_run_joins_both_halves(tmp_path):
    command = [sys.executable, "bench/bench_small_cards.py", "--smoke", "--parallel", "--cases", "1x8GB@256"]
    command += ["--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_small_cards.json").read_text())
    (case,) = report["cases"]
    assert report["parallel"] and set(report["children"]) == {"capped", "reference"}
    assert case["ok"] and len(case["capped"]["losses"]) == len(case["reference"]["losses"]) == 2
    assert case["capped"]["fp8_base"] and not case["reference"]["fp8_base"]
    assert case["loss_gap"] < 0.02
