"""Planning across nodes: the job's ranks, the plan every node runs, and the network traffic per step (issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from training.hardware.memory import lora_params
from training.hardware.network import DEFAULT_INTER_NODE_GBPS, inter_node_traffic, ring_all_reduce_bytes
from training.hardware.plan import PlanRequest, TrainingPlan, make_plan, smallest_tier_for
from training.hardware.tiers import load_tiers, nearest_tier, simulated_profile
from training.model.config import PRESETS
from training.model.targets import adapter_param_count

#: The committed tier describing two nodes (its workflow: tests/test_workflows.py).
TIERS = load_tiers()
MULTI = TIERS["2x8xH100-80GB-IB"]
ONE_NODE = TIERS["4xH100-80GB-NVLink4"]
MODEL = PRESETS["z-image"]


def decision(plan: TrainingPlan, name: str):
    (found,) = [(value, reason) for key, value, reason in plan.decisions if key == name]
    return found


def test_ring_all_reduce_moves_twice_the_payload_less_one_share():
    assert ring_all_reduce_bytes(1000, 2) == 1000
    assert ring_all_reduce_bytes(1600, 16) == pytest.approx(3000)


def test_ddp_traffic_is_one_fp32_gradient_all_reduce_per_optimizer_step():
    traffic = inter_node_traffic(
        parallelism="ddp", trainable_params=10**8, total_params=6 * 10**9, world_size=16, grad_accum=4, gbps=12.5
    )
    assert traffic.bytes_per_step == pytest.approx(2 * 15 / 16 * 4e8)  # grad_accum does not multiply (no_sync)
    assert traffic.seconds_per_step == pytest.approx(2 * 15 / 16 * 4e8 / 12.5e9)


def test_fsdp_traffic_gathers_weights_twice_and_scatters_gradients_every_micro_step():
    one = inter_node_traffic(
        parallelism="fsdp2", trainable_params=10, total_params=10, world_size=2, grad_accum=1, gbps=1
    )
    assert one.bytes_per_step == pytest.approx(2 * (10 * 2) / 2 + 10 * 4 / 2)
    three = inter_node_traffic(
        parallelism="fsdp2", trainable_params=10, total_params=10, world_size=2, grad_accum=3, gbps=1
    )
    assert three.bytes_per_step == pytest.approx(3 * one.bytes_per_step)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"parallelism": "none", "world_size": 2, "gbps": 1.0},
        {"parallelism": "ddp", "world_size": 1, "gbps": 1.0},
        {"parallelism": "ddp", "world_size": 2, "gbps": 0.0},
    ],
)
def test_traffic_refuses_what_does_not_cross_nodes(kwargs):
    with pytest.raises(ValueError):
        inter_node_traffic(trainable_params=1, total_params=1, grad_accum=1, **kwargs)


def test_a_multi_node_tier_plans_every_rank_of_every_node():
    request = PlanRequest(mode="lora", resolution=1024, lora_rank=32)
    plan = make_plan(request, simulated_profile(MULTI), tier=MULTI)
    assert (plan.nodes, plan.world_size) == (2, 16)
    assert plan.global_batch == MULTI.target_global_batch == plan.micro_batch * plan.grad_accum * 16
    assert plan.lr == pytest.approx(1e-4 * 4)  # sqrt of 16 ranks
    assert decision(plan, "inter_node_gbps") == (400.0, f"tier {MULTI.name}")
    seconds, reason = decision(plan, "inter_node_s_per_step")
    expected = 2 * 15 / 16 * lora_params(MODEL, 32, request.lora_targets) * 4 / 400e9
    assert seconds == pytest.approx(expected, abs=1e-3)
    assert "DDP: one all-reduce" in reason
    assert "on 2 nodes" in plan.table()
    assert TrainingPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_nodes_multiply_a_single_node_tier_and_keep_its_per_gpu_memory():
    request = PlanRequest(mode="lora", resolution=1024, lora_rank=32, target_global_batch=64)
    one = make_plan(request, simulated_profile(ONE_NODE), tier=ONE_NODE)
    request_two = PlanRequest(mode="lora", resolution=1024, lora_rank=32, target_global_batch=64, nodes=2)
    two = make_plan(request_two, simulated_profile(ONE_NODE), tier=ONE_NODE)
    assert (one.world_size, two.world_size, two.nodes) == (4, 8, 2)
    assert one.micro_batch == two.micro_batch and two.grad_accum * 2 == one.grad_accum
    assert two.predicted_peak_bytes == one.predicted_peak_bytes  # DDP replicas: the same per-GPU memory
    assert decision(two, "inter_node_gbps")[0] == DEFAULT_INTER_NODE_GBPS
    assert "--inter-node-gbps" in decision(two, "inter_node_gbps")[1]
    assert not [d for d in one.decisions if d[0].startswith("inter_node")]


def test_full_fine_tune_shards_over_every_rank_of_every_node():
    request = PlanRequest(mode="full", resolution=512, target_global_batch=16, inter_node_gbps=12.5)
    plan = make_plan(request, simulated_profile(MULTI), tier=MULTI)
    single = make_plan(
        PlanRequest(mode="full", resolution=512, target_global_batch=16, nodes=1), simulated_profile(MULTI), tier=MULTI
    )
    assert plan.world_size == 16 and single.world_size == 8 and single.nodes == 1
    assert plan.predicted_peak_bytes < single.predicted_peak_bytes  # weights, grads, states sharded 16 ways
    assert "FSDP2" in decision(plan, "inter_node_s_per_step")[1]


def test_a_machine_is_never_matched_to_a_multi_node_tier():
    tier, _ = nearest_tier(simulated_profile(MULTI), TIERS)
    assert tier.nodes == 1


def test_bad_node_values_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="nodes"):
        PlanRequest(mode="lora", resolution=512, nodes=0)
    with pytest.raises(ValueError, match="inter_node_gbps"):
        PlanRequest(mode="lora", resolution=512, inter_node_gbps=-1.0)
    with pytest.raises(ValueError, match="multi-node run needs GPUs"):
        make_plan(PlanRequest(mode="lora", resolution=256, nodes=2), simulated_profile(TIERS["cpu"]), tier=TIERS["cpu"])


def test_the_tier_file_schema_describes_nodes_and_their_network():
    assert (MULTI.nodes, MULTI.inter_node_gbps, MULTI.gpu_count) == (2, 400.0, 8)
    with pytest.raises(ValueError, match="nodes must be an integer >= 1"):
        type(MULTI)(**{**MULTI.to_dict(), "nodes": 0})
    with pytest.raises(ValueError, match="inter_node_gbps must be > 0"):
        type(MULTI)(**{**MULTI.to_dict(), "inter_node_gbps": 0.0})


def test_cli_plans_several_nodes_and_refuses_zero():
    command = [sys.executable, "-m", "training", "plan", "--tier", ONE_NODE.name, "--rank", "32", "--json"]
    planned = subprocess.run([*command, "--nodes", "2", "--inter-node-gbps", "50"], capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert (plan["nodes"], plan["world_size"]) == (2, 8)
    refused = subprocess.run([*command, "--nodes", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--nodes" in refused.stderr and "Traceback" not in refused.stderr


def test_the_network_prices_the_adapter_types_gradients():
    lokr = PlanRequest(mode="lora", resolution=1024, lora_rank=32, adapter="lokr")
    plan = make_plan(lokr, simulated_profile(MULTI), tier=MULTI)
    expected = 2 * 15 / 16 * adapter_param_count(MODEL, 32, lokr.lora_targets, "lokr") * 4 / 400e9
    assert decision(plan, "inter_node_s_per_step")[0] == pytest.approx(expected, abs=1e-3)
    assert (
        f"{adapter_param_count(MODEL, 32, lokr.lora_targets, 'lokr') / 1e6:.1f} M"
        in decision(plan, "inter_node_s_per_step")[1]
    )


def test_the_smallest_tier_counts_every_node_of_a_multi_node_tier():
    """A job too big for four GPUs fits eight A100s on one machine: the two-node tier (16 GPUs) is not smaller."""
    request = PlanRequest(mode="full", resolution=512, model=MODEL.replace(n_layers=120))
    sentence = smallest_tier_for(request)
    assert "8xA100-80GB-NVSwitch (8 x 80 GiB" in sentence, sentence
