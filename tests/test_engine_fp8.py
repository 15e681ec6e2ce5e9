"""FP8 for the frozen base (`fp8_frozen`): weights quantised once, forward and input gradient through _scaled_mm.

CPU torch runs ``torch._scaled_mm`` for e4m3, so the numerics are checked here; the speed is measured on the GPU
(bench/bench_speed.py, docs/benchmarks.md). e4m3 keeps 3 mantissa bits: one rounding is at most 1/16 relative, and
a product of two rounded operands summed over K terms lands far below that; the bounds below are ~2x the measured.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.engine.build import random_model
from training.engine.fp8_frozen import FP8, FrozenFP8Linear, convert_frozen_linears, quantize_rows
from training.model.config import PRESETS
from training.model.lora import LoraSettings, attach_lora, lora_state_dict


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().float() - expected.detach().float()).norm() / expected.detach().float().norm())


def frozen_linear(in_features: int, out_features: int, seed: int = 0, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    linear.requires_grad_(False)
    return linear


def test_rowwise_quantisation_round_trips_within_e4m3_precision():
    tensor = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different magnitude
    fp8, scale = quantize_rows(tensor)
    assert fp8.dtype == FP8 and scale.shape == (64, 1)
    restored = fp8.float() * scale
    assert relative_error(restored, tensor) < 0.04
    for row in range(64):  # per-row scales: small rows are as precise as large ones
        assert relative_error(restored[row], tensor[row]) < 0.05


def test_forward_and_input_gradient_match_the_float32_linear():
    linear = frozen_linear(256, 192, bias=True)
    fp8 = FrozenFP8Linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 40, 256)
    x_ref, x_fp8 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref = linear(x_ref)
    out = fp8(x_fp8)
    assert out.shape == out_ref.shape and out.dtype == torch.bfloat16
    assert relative_error(out, out_ref) < 0.06
    grad = torch.randn_like(out_ref)
    out_ref.backward(grad)
    out.backward(grad.to(torch.bfloat16))
    assert x_fp8.grad.shape == x.shape
    assert relative_error(x_fp8.grad, x_ref.grad) < 0.06


def test_weights_are_quantised_once_and_never_trained():
    fp8 = FrozenFP8Linear(frozen_linear(128, 64))
    before = fp8.weight_fp8.clone(), fp8.weight_t_fp8.clone()
    assert not any(p.requires_grad for p in fp8.parameters()) and not list(fp8.parameters())
    assert fp8.weight_fp8.shape == (64, 128) and fp8.weight_t_fp8.shape == (128, 64)
    # the two copies together take the bytes of the bf16 weight they replace
    assert fp8.weight_fp8.nbytes + fp8.weight_t_fp8.nbytes == 64 * 128 * 2
    fp8(torch.randn(8, 128, requires_grad=True)).sum().backward()
    assert torch.equal(fp8.weight_fp8, before[0]) and torch.equal(fp8.weight_t_fp8, before[1])
    assert fp8.state_dict() == {}  # nothing of the frozen base reaches checkpoints


def test_trainable_layers_are_refused():
    with pytest.raises(ValueError, match="frozen"):
        FrozenFP8Linear(nn.Linear(32, 32))


def test_lora_model_on_an_fp8_base_trains_like_the_bf16_base():
    """The tiny model (dim 64): every frozen block linear becomes FP8 under its LoRA, LoRA gradients stay close."""

    def model_with_lora():
        model = random_model(PRESETS["tiny"], dtype=torch.float32, device=torch.device("cpu"), seed=0)
        torch.manual_seed(1)
        attach_lora(model, LoraSettings(rank=4, targets="attention+ffn+refiners"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
        return model

    def loss_and_grads(model):
        generator = torch.Generator().manual_seed(5)
        latents = torch.randn(2, 16, 8, 8, generator=generator)
        features = torch.randn(2, 7, 32, generator=generator)
        out = model(latents, torch.tensor([0.3, 0.8]), features, torch.tensor([7, 4]))
        loss = out.float().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    reference, converted = model_with_lora(), model_with_lora()
    blocks = [*converted.noise_refiner, *converted.context_refiner, *converted.layers]
    count = convert_frozen_linears(blocks)
    fp8_layers = [m for m in converted.modules() if isinstance(m, FrozenFP8Linear)]
    assert count == len(fp8_layers) > 0
    names = [n for n, m in converted.named_modules() if isinstance(m, FrozenFP8Linear)]
    assert any(n.endswith(".qkv.base_layer") for n in names)  # peft's wrapped base layers are converted in place
    assert lora_state_dict(converted).keys() == lora_state_dict(reference).keys()
    loss_ref, grads_ref = loss_and_grads(reference)
    loss, grads = loss_and_grads(converted)
    assert grads.keys() == grads_ref.keys()
    assert abs(float(loss) / float(loss_ref) - 1) < 0.05
    errors = sorted(relative_error(grads[n], grads_ref[n]) for n in grads)
    median, worst = errors[len(errors) // 2], errors[-1]
    assert median < 0.15 and worst < 0.3, (median, worst)  # measured: median 0.090, worst 0.158 (e4m3: 3 mantissa bits)


def test_compiled_fp8_blocks_match_eager():
    """Dynamo traces the FP8 autograd function inside each compiled block (aot_eager: the CPU compile stays small)."""
    from training.engine.parallelize import apply_compile

    torch._dynamo.reset()
    models = []
    for _ in range(2):
        model = random_model(PRESETS["tiny"], dtype=torch.float32, device=torch.device("cpu"), seed=0)
        torch.manual_seed(1)
        attach_lora(model, LoraSettings(rank=4))
        convert_frozen_linears([*model.noise_refiner, *model.context_refiner, *model.layers])
        models.append(model)
    eager, compiled = models
    apply_compile(compiled, backend="aot_eager")
    outputs = []
    for model in (eager, compiled):
        generator = torch.Generator().manual_seed(5)
        latents = torch.randn(2, 16, 8, 8, generator=generator)
        features = torch.randn(2, 7, 32, generator=generator)
        out = model(latents, torch.tensor([0.3, 0.8]), features, torch.tensor([7, 4]))
        out.float().square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        outputs.append((out.detach(), grads))
    (out_eager, grads_eager), (out_compiled, grads_compiled) = outputs
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-2, atol=1e-3)
    for ours, theirs in zip(grads_compiled, grads_eager, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=1e-3)
