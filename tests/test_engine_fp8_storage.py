"""FP8 storage of the frozen base (`fp8_storage`): one e4m3 copy with per-row scales, upcast per layer, forward and
backward; a memory lever that runs on the CPU too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.engine.config import TrainConfig
from training.engine.fp8_frozen import FP8
from training.engine.fp8_storage import Fp8StoredLinear, convert_to_fp8_storage, dequantize
from training.hardware.offload import linear_bytes


def frozen_linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    linear.requires_grad_(False)
    return linear


def test_forward_and_input_gradient_are_the_upcast_weights():
    linear = frozen_linear()
    stored = Fp8StoredLinear(linear, compute_dtype=torch.float32)
    assert stored.weight_fp8.dtype == FP8 and stored.weight_scale.shape == (48, 1)
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = stored(x)
    weight = dequantize(stored.weight_fp8, stored.weight_scale, torch.float32)
    expected_x = x.detach().clone().requires_grad_(True)
    expected = nn.functional.linear(expected_x, weight, linear.bias)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, expected_x.grad)
    relative = (weight - linear.weight).norm() / linear.weight.norm()
    assert 0 < relative < 0.04  # e4m3 keeps 3 mantissa bits


def test_only_the_e4m3_weight_is_saved_for_backward():
    stored = Fp8StoredLinear(frozen_linear(bias=False), compute_dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        stored(torch.randn(4, 64, requires_grad=True))
    assert {t.dtype for t in saved} == {FP8, torch.float32} and sum(t.numel() for t in saved) == 48 * 64 + 48


def test_conversion_replaces_frozen_linears_and_their_bytes_match_the_planner():
    block = nn.Sequential(frozen_linear(bias=False), nn.Linear(48, 16, bias=False))  # the second trains
    assert convert_to_fp8_storage([block], compute_dtype=torch.float32, device=torch.device("cpu")) == 1
    assert isinstance(block[0], Fp8StoredLinear) and type(block[1]) is nn.Linear
    stored = block[0].weight_fp8.numel() * 1 + block[0].weight_scale.numel() * 4
    assert stored == linear_bytes([(48, 64)], "fp8") == 48 * 64 + 4 * 48
    with pytest.raises(ValueError, match="frozen weights"):
        Fp8StoredLinear(nn.Linear(4, 4), compute_dtype=torch.float32)


def test_config_refuses_lever_combinations_the_engine_does_not_run():
    def config(mode="lora", **run):
        return TrainConfig.from_dict({"mode": mode, "run": {"output_dir": "r", **run}})

    assert config(fp8_base=True, swap_blocks=4, checkpoint_depth=4).run.swap_blocks == 4
    with pytest.raises(ValueError, match="run.checkpoint_depth >= 4"):
        config(swap_blocks=4, checkpoint_depth=3)
    with pytest.raises(ValueError, match="set run.compile to false"):
        config(swap_blocks=4, checkpoint_depth=4, compile=True)
    with pytest.raises(ValueError, match="choose one"):
        config(fp8_base=True, fp8=True)
    with pytest.raises(ValueError, match="are for mode 'lora'"):
        config("qlora", fp8_base=True)
