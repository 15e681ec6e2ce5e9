"""Plans for every tier, simulated on CPU: the acceptance examples, refusals, monotonicity, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from training.__main__ import main as cli_main
from training.hardware.discovery import GpuInfo, HardwareProfile
from training.hardware.plan import (
    PlanRefused,
    PlanRequest,
    TrainingPlan,
    checkpoint_depth_for,
    make_plan,
    maximum_batch_size,
)
from training.hardware.tiers import load_tiers, nearest_tier, simulated_profile

TIERS = load_tiers()
GIB = 1 << 30


def profile(name: str) -> HardwareProfile:
    return simulated_profile(TIERS[name])


def with_free(profile: HardwareProfile, free_gib: float) -> HardwareProfile:
    gpus = tuple(dataclasses.replace(g, free_bytes=int(free_gib * GIB)) for g in profile.gpus)
    return dataclasses.replace(profile, gpus=gpus)


def test_the_tiers_load_and_round_trip_their_profiles():
    assert len(TIERS) == 11
    for name, tier in TIERS.items():
        simulated = simulated_profile(tier)
        chosen, reason = nearest_tier(simulated)
        if tier.nodes == 1:
            assert chosen.name == name, reason
        else:  # one node of a multi-node tier is matched to a single machine (see test_hardware_network.py)
            assert chosen.nodes == 1, reason
        assert HardwareProfile.from_dict(json.loads(json.dumps(simulated.to_dict()))) == simulated
    assert TIERS["2xA10-24GB"].compile is False
    assert TIERS["8xA100-80GB-NVSwitch"].nccl_timeout_s == 3600


@pytest.mark.parametrize("name", sorted(TIERS))
@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_every_tier_plans_or_refuses_with_alternatives(name, mode):
    request = PlanRequest(mode=mode, resolution=512)
    try:
        plan = make_plan(request, profile(name), tier=TIERS[name])
    except PlanRefused as refusal:
        # QLoRA r128 (4 GiB of adapter state) does not fit 8 GB; LoRA with the small-card levers is offered instead
        offers_lora = any(a.changes == {"mode": "lora"} for a in refusal.alternatives)
        small_card = mode == "qlora" and TIERS[name].gpu_memory_mib < 12 * 1024 and offers_lora
        assert mode == "full" or name == "cpu" or small_card, str(refusal)
        return
    assert plan.predicted_peak_bytes <= plan.budget_bytes
    assert plan.micro_batch * plan.grad_accum * plan.world_size == plan.global_batch == TIERS[name].target_global_batch
    assert plan.parallelism == ("fsdp2" if mode == "full" else "ddp" if plan.world_size > 1 else "none")


def test_full_finetune_on_two_a10_is_refused_with_qlora_and_lora_offered():
    with pytest.raises(PlanRefused) as caught:
        make_plan(PlanRequest(mode="full", resolution=512), profile("2xA10-24GB"))
    offered = {a.description: a for a in caught.value.alternatives}
    assert "mode qlora" in offered and "mode lora" in offered
    assert any(d.startswith("FSDP2 across") for d in offered)
    assert all(0 < a.predicted_peak_bytes <= a.budget_bytes for a in offered.values())
    assert "mode qlora" in str(caught.value) and "GiB" in str(caught.value)


def test_lora_r128_on_one_24gb_card_checkpoints():
    """The engine keeps LoRA inputs in bf16, so at 512² one sample fits without checkpointing (the plan then
    accumulates); a micro-batch of 4, or 1024², needs checkpointed blocks."""
    card = profile("1x24GB")
    at_512 = make_plan(PlanRequest(mode="lora", resolution=512, lora_rank=128), card)
    assert (at_512.micro_batch, at_512.checkpoint_depth, at_512.grad_accum) == (1, 0, 4)
    batch_4 = make_plan(PlanRequest(mode="lora", resolution=512, lora_rank=128, micro_batch=4), card)
    assert batch_4.checkpoint_depth > 0
    at_1024 = make_plan(PlanRequest(mode="lora", resolution=1024, lora_rank=128), card)
    assert at_1024.checkpoint_depth > 0


def test_80gb_plans_no_checkpointing_at_512_batch_4():
    plan = make_plan(PlanRequest(mode="lora", resolution=512, target_global_batch=4, compile=False), profile("1x80GB"))
    assert (plan.micro_batch, plan.checkpoint_depth, plan.grad_accum) == (4, 0, 1)


def test_full_finetune_shards_over_eight_a100():
    plan = make_plan(PlanRequest(mode="full", resolution=1024), profile("8xA100-80GB-NVSwitch"))
    assert plan.parallelism == "fsdp2" and plan.nccl_timeout_s == 3600
    assert plan.lr == pytest.approx(1e-4 * 8**0.5)


def test_bigger_resolution_gives_smaller_maximum_batch():
    gpu = profile("1x80GB")
    sizes = [maximum_batch_size(PlanRequest(mode="lora", resolution=r), gpu, 15) for r in (512, 768, 1024, 1536)]
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes


def test_depth_increases_as_the_budget_shrinks():
    request = PlanRequest(mode="lora", resolution=1024, compile=False)
    depths = [checkpoint_depth_for(request, with_free(profile("1x80GB"), free), 2) for free in (70, 50, 35, 25)]
    assert all(d is not None for d in depths[:3])
    assert depths == sorted(depths) and depths[0] < depths[2], depths
    assert checkpoint_depth_for(request, with_free(profile("1x80GB"), 14), 2) is None


def test_world_size_shrinks_fsdp_state():
    request = PlanRequest(mode="full", resolution=512, target_global_batch=8)
    two, four = (make_plan(dataclasses.replace(request, world_size=w), profile("4xH100-80GB-NVLink4")) for w in (2, 4))
    assert two.memory_breakdown["optimizer"] == pytest.approx(2 * four.memory_breakdown["optimizer"], rel=1e-6)


def test_plan_json_round_trip_and_table_lists_every_decision(caplog):
    with caplog.at_level(logging.INFO, logger="training.hardware.plan"):
        plan = make_plan(PlanRequest(mode="qlora", resolution=(768, 512)), profile("2xA10-24GB"))
    restored = TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert restored == plan
    table = plan.table()
    names = [name for name, _, _ in plan.decisions]
    for name in ("tier", "micro_batch", "checkpoint_depth", "grad_accum", "parallelism", "lr", "precision"):
        assert name in names
    for name, _, reason in plan.decisions:
        assert name in table and reason in table
        assert any(f"plan: {name} = " in message for message in caplog.messages)


def test_unknown_gpu_still_gets_a_plan_with_a_reason():
    gpu = GpuInfo(name="Acme Tensor 9000", total_bytes=48 * GIB, free_bytes=47 * GIB, compute_capability=(9, 0),
                  fp8=True, bandwidth_class="hbm3")  # fmt: skip
    machine = HardwareProfile(gpus=(gpu,), cpu_cores=8, ram_bytes=64 * GIB)
    tier, reason = nearest_tier(machine)
    assert "no tier names GPU 'Acme Tensor 9000'" in reason
    plan = make_plan(PlanRequest(mode="lora", resolution=1024), machine)
    assert plan.tier == tier.name and reason in plan.table()


def test_a10_is_not_taken_for_an_a100():
    assert TIERS["2xA10-24GB"].matches_gpu_name("NVIDIA A100-SXM4-80GB") is None
    assert TIERS["2xA10-24GB"].matches_gpu_name("NVIDIA A10") == "A10"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mode": "dora"}, "mode"),
        ({"resolution": 500}, "multiple of 16"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"lr_scaling": "cube"}, "lr_scaling"),
        ({"checkpoint_depth": 31}, "checkpoint_depth"),
    ],
)
def test_request_validation_names_the_bad_value(changes, message):
    with pytest.raises(ValueError, match=message):
        PlanRequest(**{"mode": "lora", "resolution": 512} | changes)


def test_forced_values_that_do_not_fit_are_refused():
    request = PlanRequest(mode="lora", resolution=1024, micro_batch=8, checkpoint_depth=0)
    with pytest.raises(PlanRefused):
        make_plan(request, profile("1x24GB"))


def test_cli_prints_a_table_and_json(capsys):
    assert cli_main(["plan", "--tier", "1x24GB", "--mode", "qlora", "--resolution", "512"]) == 0
    assert "checkpoint_depth" in capsys.readouterr().out
    assert cli_main(["plan", "--tier", "2xA10-24GB", "--mode", "full", "--json"]) == 2
    assert "refused" in json.loads(capsys.readouterr().out)
    assert cli_main(["plan", "--tier", "1x80GB", "--json", "--resolution", "768", "512"]) == 0
    assert json.loads(capsys.readouterr().out)["resolution"] == [768, 512]


def test_cli_plans_the_smoke_model_for_a_shard_set_and_writes_its_config(tmp_path, capsys):
    from tests.data_fixtures import make_dataset, write_caption
    from training.data.encoders import TestLatentEncoder, TestTextEncoder
    from training.data.pack import PackConfig, pack_dataset
    from training.engine.config import TrainConfig

    images = make_dataset(tmp_path / "in", 3)
    write_caption(sorted(images)[0], "y" * 99)
    pack_dataset(PackConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "shards", resolution=64),
                 latent_encoder=TestLatentEncoder(), text_encoder=TestTextEncoder())  # fmt: skip
    config_path = tmp_path / "run" / "config.json"
    argv = ["plan", "--tier", "cpu", "--model", "tiny", "--shards", str(tmp_path / "shards"), "--rank", "4"]
    assert cli_main([*argv, "--write-config", str(config_path), "--steps", "7"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("Plan: lora on CPU") and "longest encoded caption" in table
    config = TrainConfig.load(config_path)
    assert config.model.preset == "tiny" and config.model.dtype == "fp32" and config.run.steps == 7
    assert config.data.max_caption_tokens == 100 and config.data.shards == str((tmp_path / "shards").resolve())
    assert config.run.output_dir == str(config_path.parent.resolve()) and config.plan["lora_rank"] == 4
    assert cli_main(["plan", "--tier", "cpu", "--model", "nope.safetensors"]) == 2
    assert cli_main(["plan", "--tier", "cpu", "--write-config", str(config_path)]) == 2  # names the missing --shards


def test_cli_writes_the_variant_and_recipe_flags_into_the_config(tmp_path):
    from tests.data_fixtures import make_dataset
    from training.data.encoders import TestLatentEncoder, TestTextEncoder
    from training.data.pack import PackConfig, pack_dataset
    from training.engine.config import TrainConfig

    make_dataset(tmp_path / "in", 2)
    pack_dataset(PackConfig(input_dir=tmp_path / "in", output_dir=tmp_path / "shards", resolution=64),
                 latent_encoder=TestLatentEncoder(), text_encoder=TestTextEncoder())  # fmt: skip
    config_path = tmp_path / "run" / "config.json"
    argv = ["plan", "--tier", "cpu", "--model", "tiny", "--shards", str(tmp_path / "shards"), "--rank", "4"]
    recipe = ["--model-variant", "turbo", "--turbo-training", "dedistilled", "--sigma-sampler", "shifted_logit_normal"]
    recipe += ["--shift-rule", "flux", "--loss-weighting", "cosmap", "--logit-std", "0.8"]
    assert cli_main([*argv, *recipe, "--write-config", str(config_path)]) == 0
    config = TrainConfig.load(config_path)
    assert (config.model.variant, config.model.turbo_training) == ("turbo", "dedistilled")
    objective = config.objective
    assert (objective.sigma_sampler, objective.shift_rule, objective.loss_weighting) == (
        "shifted_logit_normal",
        "flux",
        "cosmap",
    )
    assert objective.logit_std == 0.8 and objective.shift == 3.0  # unset flags keep the defaults
    bad = [*argv, "--sigma-sampler", "cosmap", "--shift-rule", "flux", "--write-config", str(tmp_path / "x" / "c.json")]
    assert cli_main(bad) == 2  # the config's own check: cosmap has no shift
    with pytest.raises(SystemExit):
        cli_main([*argv, "--loss-weighting", "min_snr"])
