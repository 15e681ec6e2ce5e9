"""The plan reads the data: bucket shapes and caption lengths from the shard set, and the re-check before a run."""

from __future__ import annotations

import json

import pytest

from training.data.stats import DatasetStats
from training.hardware.dataset_fit import PlanDatasetMismatch, check_plan_against_dataset
from training.hardware.memory import MemoryModel, image_tokens_for
from training.hardware.plan import PlanRequest, TrainingPlan, make_plan
from training.hardware.tiers import load_tiers, simulated_profile

TIERS = load_tiers()
A10 = simulated_profile(TIERS["2xA10-24GB"])
#: 99 short captions and one VLM-written 600-token caption, portrait and square buckets around 1024².
VLM_SET = DatasetStats(
    path="shards/vlm",
    samples=100,
    buckets={(1024, 1024): 60, (832, 1216): 40},
    caption_histogram={90: 50, 120: 49, 600: 1},
)


def plan_for(dataset=None, **request):
    return make_plan(PlanRequest(**{"mode": "qlora", "resolution": 512, "dataset": dataset} | request), A10)


def decision(plan: TrainingPlan, name: str) -> tuple[object, str]:
    return next((value, reason) for n, value, reason in plan.decisions if n == name)


def test_plan_holds_the_largest_bucket_and_the_longest_caption():
    plan = plan_for(VLM_SET)
    assert plan.resolution == (1024, 1024)  # 4,096 image tokens; the portrait bucket has 3,968
    assert image_tokens_for((832, 1216)) == 3968
    assert plan.caption_tokens == 600 and plan.caption_overflow == "refuse"
    assert plan.buckets == ((832, 1216), (1024, 1024))
    value, reason = decision(plan, "caption_tokens")
    assert "longest encoded caption" in reason and "p99 120" in reason
    assert "the typed 512x512 is not what the shards hold" in decision(plan, "resolution")[1]
    assert "100 samples" in decision(plan, "dataset")[1]
    typed = plan_for(None, resolution=1024, caption_tokens=128)
    assert plan.checkpoint_depth > typed.checkpoint_depth  # the long caption costs memory, now counted
    typed_under_long_captions = MemoryModel().predict_peak(
        "qlora", 1, 4096, 608, typed.checkpoint_depth, 2, 128, parallelism=typed.parallelism, grad_accum=4
    )
    assert typed_under_long_captions.peak_bytes > typed.budget_bytes  # the OOM an hour into the run, now planned out
    check_plan_against_dataset(plan, VLM_SET)  # planned from the data: nothing to refuse


def test_a_stated_percentile_truncates_the_longer_captions():
    plan = plan_for(VLM_SET, caption_percentile=99)
    assert plan.caption_tokens == 120 and plan.caption_overflow == "truncate"
    assert "1 of 100 sample(s) are longer and will be truncated" in decision(plan, "caption_tokens")[1]
    check_plan_against_dataset(plan, VLM_SET)
    restored = TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan and "caption_overflow" in plan.table()


def test_a_typed_plan_is_refused_for_data_it_did_not_count():
    plan = plan_for(None, resolution=1024, caption_tokens=128)
    assert plan.caption_overflow == "refuse" and "no dataset linked" in decision(plan, "caption_tokens")[1]
    with pytest.raises(PlanDatasetMismatch) as refusal:
        check_plan_against_dataset(plan, VLM_SET)
    message = str(refusal.value)
    assert "buckets" not in message  # 1024x1024 holds both buckets
    assert "1 caption(s) are longer than the planned 128 tokens (longest 600)" in message
    assert "dataset input" in message and "plan --shards" in message
    small = plan_for(None, resolution=768, caption_tokens=600)
    with pytest.raises(
        PlanDatasetMismatch,
        match=r"buckets 832x1216 \(3968 tokens, 40 samples\), 1024x1024 \(4096 tokens, 60 samples\) exceed the planned 768x768",
    ):
        check_plan_against_dataset(small, VLM_SET)


def test_old_manifest_plans_from_typed_caption_length_with_a_reason():
    old = DatasetStats(path="shards/old", samples=3, buckets={(512, 512): 3})
    plan = plan_for(old, caption_tokens=200)
    assert plan.resolution == (512, 512) and plan.caption_tokens == 200
    assert "no caption-length statistics" in decision(plan, "caption_tokens")[1]
    check_plan_against_dataset(plan, old)


@pytest.mark.parametrize("bad", [10, 101, True])
def test_caption_percentile_is_validated(bad):
    with pytest.raises(ValueError, match="caption_percentile"):
        PlanRequest(mode="lora", resolution=512, caption_percentile=bad)


def test_cpu_plan_says_cpu_and_fp32():
    plan = make_plan(PlanRequest(mode="lora", resolution=256), simulated_profile(TIERS["cpu"]))
    assert plan.table().startswith("Plan: lora on CPU, tier cpu") and "GPU(s)" not in plan.table().splitlines()[0]
    assert plan.precision == "fp32" and plan.device == "cpu"
