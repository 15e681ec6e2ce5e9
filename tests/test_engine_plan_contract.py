"""The plan is the engine's contract: one from_plan mapping, a parallel strategy parallelize obeys, the attention
kernel the plan priced, and the planned caption length enforced on every batch."""

from __future__ import annotations

import logging

import pytest
import torch

from training.data.batches import Batch
from training.data.stats import DatasetStats
from training.engine.captions import CaptionLimit
from training.engine.config import PLAN_DECIDES, TrainConfig, plan_values
from training.engine.parallelize import attention_kernels, resolve_strategy
from training.hardware.plan import PlanRequest, make_plan
from training.hardware.tiers import load_tiers, simulated_profile
from training.model.config import PRESETS

TIERS = load_tiers()
DATASET = DatasetStats(path="shards", samples=10, buckets={(256, 256): 10}, caption_histogram={12: 9, 40: 1})


def tiny_plan(tier: str = "cpu", **request):
    settings = {"mode": "lora", "resolution": 256, "lora_rank": 4, "model": PRESETS["tiny"], "dataset": DATASET}
    return make_plan(PlanRequest(**settings | request), simulated_profile(TIERS[tier]))


def from_plan(plan, **sections):
    return TrainConfig.from_plan(plan, run={"output_dir": "run", "steps": 5}, data={"shards": "shards"}, **sections)


def test_from_plan_carries_every_decision():
    plan = tiny_plan("2xA10-24GB", caption_percentile=90)
    config = from_plan(plan, model={"preset": "tiny"})
    run = config.run
    assert (run.micro_batch, run.grad_accum, run.checkpoint_depth) == (
        plan.micro_batch,
        plan.grad_accum,
        plan.checkpoint_depth,
    )
    assert (run.compile, run.nccl_timeout_s, run.fsdp_cpu_offload) == (plan.compile, plan.nccl_timeout_s, False)
    assert (config.model.dtype, config.model.attention_backend) == ("bf16", plan.attention_backend) == ("bf16", "flash")
    assert (config.lora.rank, config.lora.targets, config.optim.lr) == (4, plan.lora_targets, plan.lr)
    assert (config.data.max_caption_tokens, config.data.caption_overflow) == (12, "truncate")
    assert config.parallel.strategy == plan.parallelism == "ddp" and config.plan == plan.to_dict()
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert {k: tuple(v) for k, v in plan_values(plan).items()} == PLAN_DECIDES


def test_from_plan_refuses_a_key_the_plan_decides():
    with pytest.raises(ValueError, match=r"run.micro_batch is decided by the plan"):
        TrainConfig.from_plan(tiny_plan(), run={"output_dir": "run", "micro_batch": 8}, data={"shards": "s"})
    with pytest.raises(ValueError, match="unknown section"):
        from_plan(tiny_plan(), bogus={})


def test_cpu_plan_runs_fp32_with_the_math_kernel():
    config = from_plan(tiny_plan("cpu"))
    assert (config.model.dtype, config.model.attention_backend, config.parallel.strategy) == ("fp32", "math", "none")


@pytest.mark.parametrize(
    ("strategy", "mode", "world", "expected"),
    [("auto", "lora", 1, "none"), ("auto", "lora", 2, "ddp"), ("auto", "full", 1, "fsdp2"), ("ddp", "qlora", 1, "none"),
     ("fsdp2", "full", 4, "fsdp2")],
)  # fmt: skip
def test_parallelize_obeys_the_strategy(strategy, mode, world, expected):
    assert resolve_strategy(strategy, mode=mode, world_size=world) == expected


def test_strategies_the_engine_does_not_run_are_refused():
    with pytest.raises(ValueError, match="'none' but 2 processes"):
        resolve_strategy("none", mode="lora", world_size=2)
    base = {"run": {"output_dir": "r"}, "data": {"synthetic": True}}
    with pytest.raises(ValueError, match="'fsdp2' is for mode 'full'"):
        TrainConfig.from_dict({**base, "parallel": {"strategy": "fsdp2"}})
    with pytest.raises(ValueError, match="run.fsdp_cpu_offload is for mode 'full'"):
        TrainConfig.from_dict({**base, "run": {"output_dir": "r", "fsdp_cpu_offload": True}})
    with pytest.raises(ValueError, match="fsdp_cpu_offload is for mode 'full'"):
        PlanRequest(mode="lora", resolution=512, fsdp_cpu_offload=True)


def test_lora_refusals_offer_only_what_the_engine_runs():
    from training.hardware.plan import PlanRefused

    bf16_only = PlanRequest(mode="lora", resolution=2048, base_storage="bf16", swap_blocks=0)
    with pytest.raises(PlanRefused) as refusal:
        make_plan(bf16_only, simulated_profile(TIERS["2xA10-24GB"]))
    assert all("FSDP2" not in a.description for a in refusal.value.alternatives)
    assert any(a.changes == {"mode": "qlora"} for a in refusal.value.alternatives)


def test_attention_backend_reaches_sdpa():
    with attention_kernels("math", torch.device("cpu")):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    with attention_kernels("flash", torch.device("cpu")):
        assert not torch.backends.cuda.math_sdp_enabled()  # never the quadratic kernel unless planned
        assert torch.backends.cuda.cudnn_sdp_enabled()  # cuDNN's fused kernel (Hopper's fastest) is linear too
        q = torch.randn(2, 2, 8, 16)
        mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
        mask[0, ..., 5:] = False
        assert torch.nn.functional.scaled_dot_product_attention(q, q, q, mask).shape == q.shape
    with pytest.raises(ValueError, match="needs CUDA"):
        attention_kernels("efficient", torch.device("cpu"))


def caption_batch(lengths: list[int]) -> Batch:
    longest = max(lengths)
    features = torch.randn(len(lengths), longest, 4)
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(longest)[None, :] < lengths_t[:, None]
    return Batch(keys=[f"k{i}" for i in range(len(lengths))], captions=[""] * len(lengths), size=(64, 64),
                 caption_features=features, caption_lengths=lengths_t, caption_mask=mask)  # fmt: skip


def test_truncation_cuts_features_and_counts_samples(caplog):
    limit = CaptionLimit(16, "truncate")
    batch = caption_batch([40, 12, 17])
    original = batch.caption_features.clone()
    with caplog.at_level(logging.INFO, logger="training.engine.captions"):
        out = limit.apply(batch)
        limit.apply(caption_batch([30]))
    assert out.caption_features.shape == (3, 16, 4) and torch.equal(out.caption_features, original[:, :16])
    assert out.caption_lengths.tolist() == [16, 12, 16] and out.caption_mask.sum(1).tolist() == [16, 12, 16]
    assert limit.truncated == 3 and "truncated 1 sample(s) to 16 tokens (3 so far)" in caplog.text
    untouched = caption_batch([8, 16])
    assert limit.apply(untouched) is untouched and limit.truncated == 3
    assert CaptionLimit(0, "refuse").apply(caption_batch([900])).caption_features.shape[1] == 900  # 0: no limit


def test_refuse_stops_at_the_dataset_or_the_batch():
    with pytest.raises(
        ValueError, match=r"1 of 10 captions in shards are longer than data.max_caption_tokens=16 \(longest 40"
    ):
        CaptionLimit(16, "refuse").check_dataset(DATASET)
    CaptionLimit(40, "refuse").check_dataset(DATASET)
    CaptionLimit(16, "truncate").check_dataset(DATASET)
    CaptionLimit(16, "refuse").check_dataset(DatasetStats(path="old", samples=1, buckets={(64, 64): 1}))
    with pytest.raises(ValueError, match=r"\['k0'\] have captions of up to 40 tokens"):
        CaptionLimit(16, "refuse").apply(caption_batch([40, 3]))
