"""The planner on 8, 12 and 16 GB cards: which small-card lever it chooses for LoRA r16-32 at 512² and 1024², why,
what each costs in the memory model, and the full fine-tune it refuses on 24 GB naming the smallest tier."""

from __future__ import annotations

import dataclasses

import pytest

from training.engine.config import TrainConfig
from training.hardware.fitting import estimate
from training.hardware.memory import MemoryModel
from training.hardware.offload import SWAP_SLOTS, frozen_block_bytes, swap_bytes_per_micro_step
from training.hardware.plan import PlanRefused, PlanRequest, make_plan
from training.hardware.tiers import load_tiers, simulated_profile

TIERS = load_tiers()
#: (tier, resolution) -> (base storage, swaps blocks?) the planner must choose, for rank 16 and 32 alike.
EXPECTED = {
    ("1x8GB", 512): ("fp8", True),
    ("1x8GB", 1024): ("fp8", True),
    ("1x12GB", 512): ("fp8", False),
    ("1x12GB", 1024): ("fp8", False),
    ("1x16GB", 512): ("bf16", False),
    ("1x16GB", 1024): ("fp8", False),
    ("1x24GB", 1024): ("bf16", False),
}


def plan_for(tier_name: str, resolution: int, rank: int, **request):
    tier = TIERS[tier_name]
    return make_plan(
        PlanRequest(mode="lora", resolution=resolution, lora_rank=rank, **request), simulated_profile(tier)
    )


def decision(plan, name: str):
    (found,) = [d for d in plan.decisions if d[0] == name]
    return found


def setting_of(plan):
    from training.hardware.fitting import Setting

    return Setting(
        world_size=plan.world_size,
        parallelism=plan.parallelism,
        attention_backend=plan.attention_backend,
        compiled=plan.compile,
        base_storage=plan.base_storage,
        swap_blocks=plan.swap_blocks,
    )


def request_of(plan) -> PlanRequest:
    return PlanRequest(
        mode="lora", resolution=plan.resolution, lora_rank=plan.lora_rank, target_global_batch=plan.global_batch
    )


@pytest.mark.parametrize("rank", [16, 32])
@pytest.mark.parametrize(("tier_name", "resolution"), sorted(EXPECTED))
def test_each_small_tier_plans_its_lever_with_a_reason(tier_name, resolution, rank):
    plan = plan_for(tier_name, resolution, rank)
    storage, swaps = EXPECTED[(tier_name, resolution)]
    assert (plan.base_storage, plan.swap_blocks > 0) == (storage, swaps), plan.table()
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert plan.global_batch == TIERS[tier_name].target_global_batch
    storage_reason = decision(plan, "base_storage")[2]
    swap_reason = decision(plan, "swap_blocks")[2]
    if storage == "fp8":
        assert "bf16 base: one sample needs" in storage_reason and "GiB" in storage_reason
    if swaps:
        assert plan.swap_blocks > SWAP_SLOTS and plan.checkpoint_depth >= plan.swap_blocks
        assert plan.compile is False and f"{34 - plan.swap_blocks} of 34 blocks resident" in swap_reason
        assert plan.micro_batch == 1 and plan.grad_accum == plan.global_batch  # the smallest micro-batch
        per_micro = swap_bytes_per_micro_step(plan_model(), "fp8", plan.swap_blocks)
        assert plan.swap_bytes_per_step == plan.grad_accum * per_micro
    else:
        assert plan.swap_bytes_per_step == 0 and "fits on the device" in swap_reason


def plan_model():
    return MemoryModel().model


@pytest.mark.parametrize(("tier_name", "resolution"), [("1x8GB", 512), ("1x8GB", 1024), ("1x16GB", 1024)])
def test_each_lever_is_needed_and_priced(tier_name, resolution):
    """The chosen setting fits; the one with the lever taken back (one block fewer swapped, or a bf16 base) does not,
    and the memory model prices the difference as the bytes of the weights moved off the device."""
    plan = plan_for(tier_name, resolution, 32)
    request, setting, memory = request_of(plan), setting_of(plan), MemoryModel()

    def peak(s, depth=plan.checkpoint_depth):
        return estimate(request, s, plan.micro_batch, depth, memory, grad_accum=plan.grad_accum).peak_bytes

    assert peak(setting) == plan.predicted_peak_bytes
    n = plan_model().n_layers
    if plan.swap_blocks:
        fewer = dataclasses.replace(setting, swap_blocks=plan.swap_blocks - 1)
        assert peak(fewer, n) > plan.budget_bytes
        assert peak(fewer, n) - peak(setting, n) == frozen_block_bytes(plan_model(), "fp8")
    bf16 = dataclasses.replace(setting, base_storage="bf16", swap_blocks=0)
    assert min(peak(bf16, d) for d in range(n + 1)) > plan.budget_bytes


def test_forcing_the_levers_off_on_8_gb_is_refused_with_the_levers_offered():
    with pytest.raises(PlanRefused) as refused:
        plan_for("1x8GB", 512, 16, base_storage="bf16", swap_blocks=0)
    assert any(a.description.startswith("mode qlora") for a in refused.value.alternatives)
    forced = plan_for("1x8GB", 512, 16, base_storage="fp8", swap_blocks=10)
    assert (forced.swap_blocks, decision(forced, "swap_blocks")[2]) == (10, "requested")
    assert forced.checkpoint_depth >= 10


def test_the_plan_reaches_the_engine_config():
    plan = plan_for("1x8GB", 1024, 16)
    config = TrainConfig.from_plan(plan, run={"output_dir": "r"}, data={"synthetic": True})
    assert (config.run.fp8_base, config.run.swap_blocks, config.run.compile) == (True, plan.swap_blocks, False)
    assert config.run.checkpoint_depth >= config.run.swap_blocks
    with pytest.raises(ValueError, match="run.swap_blocks is decided by the plan"):
        TrainConfig.from_plan(plan, run={"output_dir": "r", "swap_blocks": 0}, data={"synthetic": True})
    round_tripped = type(plan).from_dict(plan.to_dict())
    assert (round_tripped.base_storage, round_tripped.swap_blocks) == ("fp8", plan.swap_blocks)


def test_qlora_and_full_take_no_swap():
    qlora = make_plan(PlanRequest(mode="qlora", resolution=512, lora_rank=16), simulated_profile(TIERS["1x8GB"]))
    assert (qlora.swap_blocks, decision(qlora, "base_storage")[1]) == (0, "nf4")


def test_full_finetune_on_24_gb_is_refused_naming_the_smallest_tier():
    with pytest.raises(PlanRefused) as refused:
        make_plan(PlanRequest(mode="full", resolution=1024), simulated_profile(TIERS["1x24GB"]))
    message = str(refused.value)
    assert "a full fine-tune keeps float32 weights, gradients and adamw states (93 GiB" in message
    assert "the smallest tier that trains it is 4xA100-40GB-SXM (4 x 40 GiB, fsdp2" in message
    smallest = make_plan(PlanRequest(mode="full", resolution=1024), simulated_profile(TIERS["4xA100-40GB-SXM"]))
    assert smallest.predicted_peak_bytes <= smallest.budget_bytes
    for name in ("1x80GB", "2xA10-24GB"):  # less memory in all than the named tier, or none that fits
        tier = TIERS[name]
        with pytest.raises(PlanRefused):
            make_plan(PlanRequest(mode="full", resolution=1024), simulated_profile(tier))
