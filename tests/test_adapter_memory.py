"""The planner prices each adapter type: trainable parameters equal to what peft creates on the full-size model (built
on the meta device), and the activation terms of ``adapter_memory`` move the peak the way they should."""

from __future__ import annotations

import pytest
import torch

from training.engine.config import TrainConfig
from training.hardware.adapter_memory import adapter_terms
from training.hardware.memory import FP32, MemoryModel, image_tokens_for
from training.hardware.request import PlanRequest
from training.model.config import PRESETS
from training.model.lora import LoraSettings, attach_lora
from training.model.targets import adapter_param_count
from training.model.zimage import ZImageTransformer
from training.vocabulary import ADAPTER_TYPES

FULL = PRESETS["z-image"]
#: the narrowest and the widest preset plus the default (test_adapters checks every preset on the tiny model)
FULL_TARGETS = ("attention", "attention+ffn", "all")


@pytest.fixture(scope="module")
def meta_counts() -> dict[tuple[str, str], int]:
    """Trainable parameters peft creates on the full-size Z-Image, per (adapter, targets), rank 32."""
    counts = {}
    for adapter in ADAPTER_TYPES:
        for targets in FULL_TARGETS:
            with torch.device("meta"):
                model = attach_lora(ZImageTransformer(FULL), LoraSettings(rank=32, targets=targets, adapter=adapter))
            counts[adapter, targets] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


@pytest.mark.parametrize("targets", FULL_TARGETS)
@pytest.mark.parametrize("adapter", ADAPTER_TYPES)
def test_planner_prices_the_parameters_peft_creates_on_the_full_model(meta_counts, adapter, targets):
    expected = meta_counts[adapter, targets]
    assert adapter_param_count(FULL, 32, targets, adapter) == expected
    fixed = MemoryModel().fixed_bytes("lora", 1, "none", 32, lora_targets=targets, adapter=adapter)
    assert fixed["trainable"] == expected * FP32 and fixed["grads"] == expected * FP32
    assert fixed["optimizer"] == 2 * expected * FP32  # AdamW: two fp32 states per parameter


def test_full_model_counts_at_rank_32(meta_counts):
    """The numbers themselves (attention+ffn, r32), for the docs: LoKr is tiny, LoHa twice LoRA, DoRA LoRA + rows."""
    lora, dora = meta_counts["lora", "attention+ffn"], meta_counts["dora", "attention+ffn"]
    assert lora == 30 * 32 * (4 * 3840 + 2 * 3840 + 3 * (3840 + 10240))  # qkv, out, w1/w2/w3 of 30 main layers
    assert dora - lora == 30 * (3 * 3840 + 3840 + 10240 + 3840 + 10240)  # one magnitude per output row
    assert meta_counts["loha", "attention+ffn"] == 2 * lora
    assert meta_counts["lokr", "attention+ffn"] < lora / 30  # 1.57 M against 62.7 M


def _peak(adapter: str, depth: int, mode: str = "lora", part: str | None = None) -> int:
    tokens = image_tokens_for((512, 512))
    estimate = MemoryModel().predict_peak(mode, 4, tokens, 128, depth, 1, 32, adapter=adapter)
    return estimate.peak_bytes if part is None else estimate.breakdown[part]


def test_dora_costs_activations_per_token_and_lokr_loha_a_weight_per_block():
    tokens = 4 * (image_tokens_for((512, 512)) + 128)
    dora = adapter_terms(FULL, "dora", 32, "attention+ffn", 2)
    assert dora.per_token_block == 2 * 2 * (5 * FULL.dim + 2 * FULL.ffn_hidden_dim) and dora.per_block == 0
    lokr = adapter_terms(FULL, "lokr", 32, "attention+ffn", 2)
    assert lokr.per_block == 2 * FULL.linear_params_per_block()  # the bf16 delta of every targeted linear
    assert lokr.per_token_block == -5 * 32 * 2
    assert adapter_terms(FULL, "lora", 32, "all", 2) == adapter_terms(FULL, "lora", 32, "attention", 4)
    # no checkpointing: every block keeps its extras; all checkpointed: only the recomputed block does
    for adapter in ("dora", "lokr", "loha"):
        assert _peak(adapter, 0) > _peak("lora", 0)
        unchecked = _peak(adapter, 0, part="activations") - _peak("lora", 0, part="activations")
        checked = _peak(adapter, 30, part="activations") - _peak("lora", 30, part="activations")
        assert unchecked > 10 * checked > 0
    expected = 30 * (dora.per_token_block * tokens) + dora.transient
    measured = _peak("dora", 0, part="activations") - _peak("lora", 0, part="activations")
    assert measured == pytest.approx(expected, rel=0.01)


def test_full_fine_tune_ignores_the_adapter_type():
    assert _peak("lokr", 5, mode="full") == _peak("lora", 5, mode="full")


def test_plan_request_refuses_lokr_and_loha_on_qlora_and_unknown_types():
    with pytest.raises(ValueError, match="PlanRequest.adapter: adapter 'loha' cannot train on mode 'qlora'"):
        PlanRequest(mode="qlora", resolution=512, adapter="loha")
    with pytest.raises(ValueError, match="PlanRequest.adapter 'ia3' is not one of"):
        PlanRequest(mode="lora", resolution=512, adapter="ia3")


def test_the_plan_carries_the_adapter_into_the_run_config():
    from training.hardware.plan import make_plan
    from training.hardware.tiers import load_tiers, simulated_profile

    profile = simulated_profile(load_tiers()["1x80GB"])
    plan = make_plan(PlanRequest(mode="lora", resolution=512, lora_rank=32, adapter="lokr"), profile)
    assert plan.adapter == "lokr"
    lora_plan = make_plan(PlanRequest(mode="lora", resolution=512, lora_rank=32), profile)
    assert plan.predicted_peak_bytes != lora_plan.predicted_peak_bytes
    config = TrainConfig.from_plan(plan, run={"output_dir": "x"}, data={"synthetic": True})
    assert config.lora.adapter == "lokr"
    with pytest.raises(ValueError, match="lora.adapter is decided by the plan"):
        TrainConfig.from_plan(plan, run={"output_dir": "x"}, data={"synthetic": True}, lora={"adapter": "dora"})
