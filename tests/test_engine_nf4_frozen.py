"""QLoRA's NF4 base as plain tensors (training/engine/nf4_frozen.py): the same numbers as bitsandbytes' own
dequantisation, the same bytes (shared, not copied), and the same training step under LoRA and DoRA, eager and
compiled."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from training.engine.build import apply_mode, build_model  # noqa: E402
from training.engine.config import TrainConfig  # noqa: E402
from training.engine.distributed import DistInfo  # noqa: E402
from training.engine.nf4_frozen import FrozenNF4Linear, convert_nf4_linears  # noqa: E402
from training.engine.quantize import to_nf4  # noqa: E402

CPU = torch.device("cpu")
INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU, backend="gloo")


def nf4_layer(out_features: int, in_features: int, dtype: torch.dtype, *, bias: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias).to(dtype).requires_grad_(False)
    return to_nf4(linear, compute_dtype=dtype)


def bitsandbytes_reference(layer: nn.Module) -> torch.Tensor:
    """bitsandbytes' own PyTorch dequantisation (its default backend, written to match its CUDA kernel: float32
    code times absmax, then the cast); its CPU library kernel rounds differently (checked below)."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    state = layer.weight.quant_state
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = layer.weight.data.reshape(-1)
    return default_ops._dequantize_4bit_compute(packed, absmax, state.code, state.blocksize, state.shape, state.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 80), (256, 512), (48, 64)])  # 120, 2048 and 48 blocks: nested blocks partial
def test_dequantisation_equals_bitsandbytes_bit_for_bit(dtype, shape):
    layer = nf4_layer(*shape, dtype)
    reference = bitsandbytes_reference(layer)
    frozen = FrozenNF4Linear(layer)
    assert frozen.weight.dtype == reference.dtype == dtype and frozen.weight.shape == shape
    assert torch.equal(frozen.weight, reference)
    # the CPU library kernel (what dequantize_4bit calls here) is within one NF4 step of it, relative to the block
    library = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    scale = reference.float().reshape(-1, 64).abs().amax(1, keepdim=True)
    assert ((library.float() - reference.float()).reshape(-1, 64).abs() / scale).max() < 0.08


def test_the_packed_tensors_are_shared_not_copied():
    layer = nf4_layer(96, 80, torch.float32)
    frozen = FrozenNF4Linear(layer)
    state = layer.weight.quant_state
    assert frozen.packed.data_ptr() == layer.weight.data.data_ptr()
    assert frozen.absmax.data_ptr() == state.absmax.data_ptr()
    assert frozen.nested_absmax.data_ptr() == state.state2.absmax.data_ptr()
    assert frozen.state_dict() == {}  # the frozen base is never saved from here


def test_forward_and_input_gradient_are_the_dequantised_weights_products():
    layer = nf4_layer(96, 80, torch.float32, bias=True)
    frozen = FrozenNF4Linear(layer)
    weight = bitsandbytes_reference(layer)
    x = torch.randn(2, 7, 80, requires_grad=True)
    out = frozen(x)
    expected = x.detach() @ weight.t() + layer.bias
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-6, atol=1e-6)


def test_the_triton_kernel_is_chosen_only_for_bf16_weights_with_a_gpu_and_triton():
    from training.engine import nf4_kernel

    frozen = FrozenNF4Linear(nf4_layer(96, 80, torch.bfloat16))
    gpu_and_triton = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
    assert frozen.layout.kernel is (gpu_and_triton and nf4_kernel.self_check(torch.device("cuda", 0)))
    assert not nf4_kernel.available(torch.float32)
    x = torch.randn(3, 80, dtype=torch.bfloat16)
    with_kernel = FrozenNF4Linear(nf4_layer(96, 80, torch.bfloat16))
    with_kernel.layout = dataclasses.replace(with_kernel.layout, kernel=True)
    assert torch.equal(with_kernel(x), frozen(x))  # CPU tensors take the PyTorch ops even where the kernel is chosen


def test_a_layer_that_is_not_nf4_with_double_quantisation_is_refused():
    torch.manual_seed(0)
    linear = nn.Linear(64, 64, bias=False).requires_grad_(False)
    single = bnb.nn.Linear4bit(64, 64, bias=False, compress_statistics=False, quant_type="nf4", device="meta")
    single.weight = bnb.nn.Params4bit(linear.weight.detach(), requires_grad=False, compress_statistics=False,
                                      quant_type="nf4", module=single).to("cpu")  # fmt: skip
    with pytest.raises(ValueError, match="double quantisation"):
        FrozenNF4Linear(single)


def qlora_config(adapter: str) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "mode": "qlora",
            "run": {"output_dir": "unused"},
            "model": {"preset": "tiny", "dtype": "fp32"},
            "lora": {"rank": 4, "targets": "attention+ffn", "adapter": adapter},
            "data": {"synthetic": True},
        }
    )


def qlora_model(adapter: str) -> nn.Module:
    config = qlora_config(adapter)
    model = build_model(config, INFO)
    apply_mode(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # B starts at zero; make the adapter matter for the gradients
    return model


def step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    features = torch.randn(2, 5, 32, generator=generator)
    out = model(latents, torch.tensor([0.2, 0.7]), features, None)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_a_qlora_step_is_the_same_on_the_plain_tensors(adapter):
    model = qlora_model(adapter)
    reference_out, reference_grads = step(model)
    converted = convert_nf4_linears(model.blocks())
    assert converted == 23 and not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    out, grads = step(model)
    torch.testing.assert_close(out, reference_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_blocks_on_the_plain_tensors_match_eager():
    from training.engine.parallelize import apply_compile

    model = qlora_model("lora")
    convert_nf4_linears(model.blocks())
    eager_out, eager_grads = step(model)
    apply_compile(model)
    out, grads = step(model)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_blocks_recompute_the_weight_for_the_backward_instead_of_keeping_it():
    """Regression: compiled, the backward's dequantisation was merged with the forward's and the partitioner kept
    every dequantised weight for the backward (the bf16 base QLoRA exists to avoid)."""
    from training.engine.parallelize import apply_compile

    model = qlora_model("lora")
    convert_nf4_linears(model.blocks())
    weights = [m.weight for m in model.modules() if isinstance(m, FrozenNF4Linear)]
    apply_compile(model)
    step(model)  # compiled
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda t: t):
        step(model)
    kept = [w.shape for w in weights if any(t.shape == w.shape and torch.equal(t, w) for t in saved)]
    assert saved and not kept


def test_the_kernel_is_used_only_after_its_self_check_matches_the_pytorch_ops(monkeypatch, caplog):
    """A kernel whose weights differ from the PyTorch ops' in one value, or that fails, is refused, saying so; an
    equal one is used."""
    from training.engine import nf4_kernel
    from training.engine.nf4_frozen import BUFFER_NAMES, NF4Layout, dequantize_nf4

    def pytorch_ops(offby: float):
        def dequantize(*args):
            tensors, (rows, cols, blocksize, nested) = dict(zip(BUFFER_NAMES, args[:6])), args[6:]
            layout = NF4Layout(shape=(rows, cols), dtype=torch.bfloat16, blocksize=blocksize, nested_blocksize=nested)
            weight = dequantize_nf4(tensors, layout).clone()
            weight.view(-1)[5] += offby
            return weight

        return lambda: (dequantize, lambda grad, *args: grad @ dequantize(*args))

    monkeypatch.setattr(nf4_kernel, "operators", pytorch_ops(0.0))
    assert nf4_kernel.self_check.__wrapped__(CPU) is True
    monkeypatch.setattr(nf4_kernel, "operators", pytorch_ops(1.0))
    assert nf4_kernel.self_check.__wrapped__(CPU) is False
    assert "differs from the PyTorch ops in 1 of 30720 weights; using the PyTorch ops" in caplog.text

    def no_triton():
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(nf4_kernel, "operators", no_triton)
    assert nf4_kernel.self_check.__wrapped__(CPU) is False
    assert "the Triton kernel failed; using the PyTorch ops" in caplog.text and "no kernel image" in caplog.text
