"""bench_ours.apply_levers: each experiment item sets what it says (issue 12's A/Bs run each item in its own process)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch._inductor import config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

KNOBS = ("max_autotune_gemm", "max_autotune_gemm_backends", "benchmark_epilogue_fusion")


@pytest.mark.parametrize(("item", "timed_fusion"), [("lora-512+autotune", True), ("lora-512+autotune-fast", False)])
def test_the_autotune_items_set_inductors_gemm_autotuning(item, timed_fusion):
    from bench_ours import OUR_CONFIGS, apply_levers

    knobs = {knob: getattr(inductor_config, knob) for knob in KNOBS}
    with inductor_config.patch({**knobs, "triton.enable_persistent_tma_matmul": False}):  # restored after
        apply_levers(OUR_CONFIGS[item])
        assert inductor_config.max_autotune_gemm is True
        assert inductor_config.max_autotune_gemm_backends == "ATEN,TRITON"
        assert inductor_config.triton.enable_persistent_tma_matmul is True
        assert inductor_config.benchmark_epilogue_fusion is timed_fusion
    assert {knob: getattr(inductor_config, knob) for knob in KNOBS} == knobs
