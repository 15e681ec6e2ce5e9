"""The planner over every bucket shape of a multi-resolution run: the largest shape decides the depth and the global
batch; each resolution gets the largest micro-batch that fits and divides a step's samples per rank."""

from __future__ import annotations

import pytest

from training.data.stats import DatasetStats
from training.engine.config import TrainConfig
from training.hardware.request import PlanRequest
from training.hardware.shape_plan import dataset_shapes, plan_shapes
from training.hardware.tiers import load_tiers, simulated_profile

H100 = simulated_profile(load_tiers()["1x80GB"])
SHAPES = {512: [(512, 512), (448, 576)], 1024: [(1024, 1024), (832, 1216)]}


def test_every_resolution_fills_memory_and_keeps_the_effective_batch(tmp_path):
    plan = plan_shapes(PlanRequest(mode="lora", resolution=1024, compile=False), H100, SHAPES)
    per_rank = plan.base.micro_batch * plan.base.grad_accum
    low, high = plan.resolution(512), plan.resolution(1024)
    assert low[0] > high[0] and low[0] * low[1] == high[0] * high[1] == per_rank
    assert high[0] == plan.base.micro_batch  # the largest shape's own plan
    for fit in plan.shapes:
        assert fit.micro_batch <= fit.fits and per_rank % fit.micro_batch == 0
        assert fit.predicted_peak_bytes <= plan.base.budget_bytes
        # the next larger divisor would not fit: the micro-batch is the largest that does
        larger = [m for m in range(fit.micro_batch + 1, per_rank + 1) if per_rank % m == 0]
        assert not larger or larger[0] > min(f.fits for f in plan.shapes if f.resolution == fit.resolution)
    assert low[2] < high[2]
    section = plan.section() | {"schedule": "progressive", "stages": [[512, 0.4], [1024, 1.0]]}
    data = {"synthetic": True, "resolution": 1024}
    config = TrainConfig.from_plan(plan.base, run={"output_dir": str(tmp_path)}, data=data, resolutions=section)
    assert config.resolutions.sizes(512, config.run) == low[:2]
    assert [s["shape"] for s in plan.to_dict()["shapes"]] == [[512, 512], [448, 576], [1024, 1024], [832, 1216]]


def test_shapes_come_from_a_multi_resolution_manifest():
    stats = DatasetStats(
        path="set",
        samples=5,
        buckets={(512, 512): 2, (1024, 1024): 3},
        resolutions={512: {(512, 512): 2}, 1024: {(1024, 1024): 3}},
    )
    assert dataset_shapes(stats) == {512: [(512, 512)], 1024: [(1024, 1024)]}
    with pytest.raises(ValueError, match="names no pack resolution"):
        dataset_shapes(DatasetStats(path="old", samples=1, buckets={(64, 64): 1}))
    with pytest.raises(ValueError, match="at least one bucket per resolution"):
        plan_shapes(PlanRequest(mode="lora", resolution=1024), H100, {512: []})
