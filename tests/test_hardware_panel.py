"""The Training Plan node's panel: human labels (no engine field names), every reason whole, wrapped to its width."""

from __future__ import annotations

import pytest

from training.hardware.panel import DECISION_LABELS, LABEL_WIDTH, REASON_WIDTH, plan_panel
from training.hardware.plan import PlanRequest, make_plan
from training.hardware.tiers import load_tiers, simulated_profile

TIERS = load_tiers()


@pytest.mark.parametrize("tier_name", ["cpu", "2xA10-24GB", "8xA100-80GB-NVSwitch"])
def test_panel_shows_every_decision_with_a_label_and_its_whole_reason(tier_name):
    tier = TIERS[tier_name]
    mode = "qlora" if tier_name == "2xA10-24GB" else "lora"
    plan = make_plan(PlanRequest(mode=mode, resolution=512), simulated_profile(tier), tier=tier)
    text = plan_panel(plan)
    lines = text.split("\n")
    assert "budget_bytes" not in text and "_bytes" not in text and "grad_accum" not in text
    longest_value = max(len(str(value)) for _, value, _ in plan.decisions if not isinstance(value, int | float))
    assert max(map(len, lines)) <= LABEL_WIDTH + max(9, longest_value) + 4 + REASON_WIDTH
    flat = " ".join(" ".join(line.split()) for line in lines)
    for name, _, reason in plan.decisions:
        assert DECISION_LABELS[name] in text, f"no label for {name}"
        assert " ".join(reason.split()) in flat, f"reason of {name} is cut: {reason!r}"
    assert ("on the CPU" in lines[0]) == (tier_name == "cpu")
    assert "GPU(s)" not in lines[0]


def test_every_planner_decision_has_a_label():
    names = set()
    for tier in TIERS.values():
        for mode in tier.modes_allowed:
            plan = make_plan(PlanRequest(mode=mode, resolution=512), simulated_profile(tier), tier=tier)
            names |= {name for name, _, _ in plan.decisions}
    assert names <= set(DECISION_LABELS), names - set(DECISION_LABELS)
