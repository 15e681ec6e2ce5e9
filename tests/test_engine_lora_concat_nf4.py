"""LoRA's up-projection in QLoRA's NF4 base GEMM (training/engine/lora_concat.py over nf4_frozen.FrozenNF4Linear): the
same forward and gradients as peft's QLoRA path over optimizer steps, eager and compiled, no dequantised weight kept
for the backward, and the kernel's operator pair beside B checked apart from the plain pair. On the CPU the PyTorch
ops dequantise (the Triton kernel is checked by tests/test_engine_nf4_kernel.py where Triton is installed)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from test_engine_nf4_frozen import CPU, qlora_model, step  # noqa: E402

from training.engine.lora_concat import ConcatNF4LoraLinear, apply_lora_concat, concat_eligible  # noqa: E402
from training.engine.nf4_frozen import FrozenNF4Linear, convert_nf4_linears  # noqa: E402
from training.model.lora import lora_layers  # noqa: E402


def converted_pair():
    """peft's QLoRA model on the plain NF4 tensors, and a copy to convert."""
    reference = qlora_model("lora")
    convert_nf4_linears(reference.blocks())
    return reference, copy.deepcopy(reference)


def assert_same_steps(reference, concat, steps: int = 3) -> None:
    """Equal outputs and LoRA gradients over fused-AdamW steps of ``concat`` (``reference`` is given its parameters
    before each step): B changes every step and the dequantisation beside it must see the new values."""
    trained = {n: p for n, p in concat.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trained.values(), lr=0.05, fused=True)
    for index in range(steps):
        with torch.no_grad():
            for name, param in reference.named_parameters():
                if param.requires_grad:
                    param.copy_(trained[name])
        (out_ref, grads_ref), (out_cat, grads_cat) = step(reference), step(concat)
        torch.testing.assert_close(out_cat, out_ref, rtol=1e-5, atol=1e-5, msg=f"step {index}")
        assert grads_cat.keys() == grads_ref.keys()
        for name, grad in grads_ref.items():
            torch.testing.assert_close(grads_cat[name], grad, rtol=1e-4, atol=1e-6, msg=f"step {index} {name}")
            trained[name].grad = grads_cat[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # `step` accumulates into the gradients it finds


def test_every_nf4_lora_layer_is_converted_and_trains_as_peft():
    reference, concat = converted_pair()
    layers = lora_layers(concat)
    assert all(type(layer.get_base_layer()) is FrozenNF4Linear for layer in layers.values())
    assert all(concat_eligible(layer) is None for layer in layers.values())
    assert apply_lora_concat(concat) == len(layers) > 0
    assert all(type(layer) is ConcatNF4LoraLinear and not layer.nf4_kernel_beside for layer in layers.values())
    assert not concat._forward_pre_hooks  # nothing to mirror: B is read where it is
    assert concat.state_dict().keys() == reference.state_dict().keys()
    assert_same_steps(reference, concat)


def test_compiled_blocks_train_as_peft_and_keep_no_dequantised_weight():
    from training.engine.parallelize import apply_compile

    torch._dynamo.reset()
    reference, concat = converted_pair()
    apply_lora_concat(concat)
    for model in (reference, concat):
        apply_compile(model)
    assert_same_steps(reference, concat, steps=2)
    weights = [m.weight for m in concat.modules() if isinstance(m, FrozenNF4Linear)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda t: t):
        step(concat)

    rank = next(iter(lora_layers(concat).values())).lora_A["default"].weight.shape[0]

    def holds(tensor, weight):  # W or [W | B] in any shape or dtype: its size, and every value of W in it
        rows, cols = weight.shape
        if tensor.numel() not in (rows * cols, rows * (cols + rank)):
            return False
        return bool(torch.isin(weight.flatten(), tensor.detach().float().flatten()).all())

    kept = [w.shape for w in weights if any(holds(t, w) for t in saved)]
    assert saved and not kept  # neither W nor [W | B] is kept for the backward


def bf16_pair():
    """The same models with a bf16 frozen base (the dtype the gate allows on the GPU), float32 adapters."""
    from test_engine_nf4_frozen import INFO

    from training.engine.build import apply_mode, build_model
    from training.engine.config import TrainConfig

    config = TrainConfig.from_dict(
        {
            "mode": "qlora",
            "run": {"output_dir": "unused"},
            "model": {"preset": "tiny", "dtype": "bf16"},
            "lora": {"rank": 4, "targets": "attention+ffn"},
            "data": {"synthetic": True},
        }
    )
    reference = build_model(config, INFO)
    apply_mode(reference, config)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    convert_nf4_linears(reference.blocks())
    return reference, copy.deepcopy(reference)


def test_a_bf16_base_computes_as_peft_within_bf16_rounding():
    """bf16 base, float32 adapters under autocast: B cast to bf16 beside W, one GEMM; the outputs, their dtype and
    the LoRA gradients equal peft's path to bf16 rounding (peft rounds three products, the one GEMM once)."""
    reference, concat = bf16_pair()
    assert apply_lora_concat(concat) == len(lora_layers(concat)) > 0
    layer = next(iter(lora_layers(concat).values()))
    assert (
        layer.get_base_layer().layout.dtype == torch.bfloat16 and layer.lora_B["default"].weight.dtype == torch.float32
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out_ref, grads_ref), (out_cat, grads_cat) = step(reference), step(concat)
    assert out_cat.dtype == out_ref.dtype
    torch.testing.assert_close(out_cat, out_ref, rtol=2e-2, atol=2e-2)
    for name, grad in grads_ref.items():
        assert grads_cat[name].dtype == grad.dtype, name
        error = (grads_cat[name] - grad).norm() / grad.norm()
        assert error < 3e-2, (name, error.item())  # a stale B or a lost scale is off by 100%


def test_an_nf4_base_that_is_not_plain_keeps_peft():
    _, model = converted_pair()
    layer = next(iter(lora_layers(model).values()))
    base = layer.get_base_layer()
    base.compute_dtype = torch.bfloat16  # the weight is float32: peft's path casts, the one GEMM would not
    assert "another dtype" in concat_eligible(layer)
    base.compute_dtype = base.layout.dtype
    base.register_buffer("bias", torch.zeros(base.out_features), persistent=False)
    assert "bias" in concat_eligible(layer)


def test_a_failed_self_check_of_the_beside_pair_keeps_the_plain_kernel(monkeypatch):
    """On a GPU whose kernel passes the plain pair's check but not the beside pair's, the layer keeps peft's path
    over the fast plain kernel instead of falling to the PyTorch ops."""
    import dataclasses

    from training.engine import nf4_kernel

    _, model = converted_pair()
    layer = next(iter(lora_layers(model).values()))
    base = layer.get_base_layer()
    base.layout = dataclasses.replace(base.layout, kernel=True)
    asked = []
    monkeypatch.setattr(nf4_kernel, "available", lambda dtype, *, beside=False: asked.append(beside) or not beside)
    assert "self-check" in concat_eligible(layer) and asked == [True]
    monkeypatch.setattr(nf4_kernel, "available", lambda dtype, *, beside=False: True)
    assert concat_eligible(layer) is None


def test_the_beside_self_check_compares_w_and_b_side_by_side(monkeypatch, caplog):
    """The beside pair's self-check against [W | B] from the PyTorch ops: equal passes, one value off fails, saying
    which pair."""
    from training.engine import nf4_kernel
    from training.engine.nf4_frozen import BUFFER_NAMES, NF4Layout, dequantize_nf4

    def pytorch_ops(offby: float):
        def dequantize(beside, *args):
            tensors, (rows, cols, blocksize, nested) = dict(zip(BUFFER_NAMES, args[:6])), args[6:]
            layout = NF4Layout(shape=(rows, cols), dtype=torch.bfloat16, blocksize=blocksize, nested_blocksize=nested)
            combined = torch.cat((dequantize_nf4(tensors, layout), beside), dim=1)
            combined.view(-1)[-1] += offby  # in B's columns: a kernel that garbles the copy is caught too
            return combined

        return lambda: (dequantize, lambda grad, *args: grad @ dequantize(*args))

    monkeypatch.setattr(nf4_kernel, "beside_operators", pytorch_ops(0.0))
    assert nf4_kernel.self_check.__wrapped__(CPU, beside=True) is True
    monkeypatch.setattr(nf4_kernel, "beside_operators", pytorch_ops(1.0))
    assert nf4_kernel.self_check.__wrapped__(CPU, beside=True) is False
    assert "NF4 dequantisation beside LoRA's B on cpu: the Triton kernel differs" in caplog.text


def test_the_gate_opens_for_compiled_qlora_on_one_cuda_process_and_the_bench_item_closes_it(monkeypatch):
    """Measured on the H200 (2026-12-04, +2.6%), compiled QLoRA on one CUDA process takes the lever by default;
    its other conditions stay, and the bench item ``qlora-512-peft`` (the A/B's reference) keeps peft's path."""
    import sys
    from pathlib import Path

    from training.engine import parallelize

    where = dict(mode="qlora", compile=True, plain_base=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    assert parallelize.lora_concat_applies(**where, strategy="none")
    assert not parallelize.lora_concat_applies(**where, strategy="ddp")
    assert not parallelize.lora_concat_applies(**(where | {"compile": False}), strategy="none")
    assert not parallelize.lora_concat_applies(**(where | {"device": CPU}), strategy="none")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    monkeypatch.setattr(parallelize, "apply_lora_concat_gemms", parallelize.apply_lora_concat_gemms)  # restored
    from bench_ours import OUR_CONFIGS, apply_levers

    lever = parallelize.apply_lora_concat_gemms
    apply_levers(OUR_CONFIGS["qlora-512"])
    assert parallelize.apply_lora_concat_gemms is lever
    apply_levers(OUR_CONFIGS["qlora-512-peft"])
    assert parallelize.apply_lora_concat_gemms is not lever
    sys.modules.pop("bench_ours", None)


def test_a_compiled_qlora_engine_run_through_the_open_gate_equals_peft(tmp_path, monkeypatch, caplog):
    """The whole engine on the CPU (compiled blocks over the plain NF4 tensors, grad accumulation, checkpointing,
    AdamW, the LoRA file) with the gate forced open (the CPU closes it): the loss curve and the adapter file equal peft's QLoRA run."""
    from safetensors.torch import load_file
    from test_engine_runs import STEPS, tiny_config, train_in_process

    from training.engine import parallelize

    torch._dynamo.reset()
    config = lambda name: tiny_config(tmp_path / name, "qlora", compile=True)  # noqa: E731
    reference = train_in_process(config("peft"))
    monkeypatch.setattr(parallelize, "lora_concat_applies", lambda **conditions: True)
    with caplog.at_level("INFO", logger="training.engine.parallelize"):
        concat = train_in_process(config("concat"))
    assert "LoRA: 10 layers compute" in caplog.text
    assert len(concat) == len(reference) == STEPS
    for got, want in zip(concat, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), got["step"]
    files = [load_file(tmp_path / run / "lora.safetensors") for run in ("peft", "concat")]
    assert files[0].keys() == files[1].keys()
    for key, value in files[0].items():
        # the file holds bf16: float32 weights equal to 1e-5 may round one bf16 step apart (seen: 1 of 680 values)
        torch.testing.assert_close(files[1][key], value, rtol=2**-7, atol=1e-6, msg=key)
        assert (files[1][key] != value).float().mean() <= 0.01, key
