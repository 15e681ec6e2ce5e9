"""The model each mode trains: QLoRA's NF4 base (double quantisation) under LoRA, LoRA's float32 adapters over a
bf16 base, and a random init that is the same on every rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.engine.build import apply_mode, build_model, random_model
from training.engine.config import TrainConfig
from training.engine.distributed import DistInfo
from training.model.config import PRESETS

CPU = torch.device("cpu")
INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU, backend="gloo")


def config(mode: str, dtype: str = "fp32") -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "mode": mode,
            "run": {"output_dir": "unused"},
            "model": {"preset": "tiny", "dtype": dtype},
            "lora": {"rank": 4, "targets": "attention+ffn"},
            "data": {"synthetic": True},
        }
    )


def forward(model: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    return model(latents, torch.tensor([0.2, 0.7]), torch.randn(2, 5, 32, generator=generator), None)


def test_qlora_base_is_nf4_with_double_quantisation_under_lora():
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import LoraLayer

    train_config = config("qlora")
    model = build_model(train_config, INFO)
    reference = forward(model).detach()
    apply_mode(model, train_config)
    block_linears = [m for block in model.blocks() for m in block.modules() if isinstance(m, nn.Linear)]
    quantized = [m for m in block_linears if isinstance(m, bnb.nn.Linear4bit)]
    # every block linear is NF4 except LoRA's own A/B
    assert len(quantized) == len([m for m in block_linears if type(m) is not nn.Linear]) == 23
    for layer in quantized:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested, "NF4 with double quantisation"
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in lora_layers)
    assert type(model.x_embedder) is nn.Linear and type(model.final_layer.linear) is nn.Linear
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    out = forward(model)  # LoRA B is zero: the output is the 4-bit base's
    assert (out - reference).norm() / reference.norm() < 0.2
    out.square().mean().backward()
    assert all(p.grad is not None for p in trainable)


def test_lora_adapters_are_float32_over_a_bf16_base():
    train_config = config("lora", dtype="bf16")
    model = build_model(train_config, INFO)
    apply_mode(model, train_config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if name in trainable else torch.bfloat16), name
    forward(model).float().square().mean().backward()


def test_full_mode_trains_every_parameter_in_float32():
    train_config = config("full", dtype="bf16")
    model = build_model(train_config, INFO)
    apply_mode(model, train_config)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


def test_random_init_is_a_function_of_the_seed():
    first = random_model(PRESETS["tiny"], dtype=torch.float32, device=CPU, seed=4)
    torch.randn(100)  # whatever happened to the global RNG before
    second = random_model(PRESETS["tiny"], dtype=torch.float32, device=CPU, seed=4)
    other = random_model(PRESETS["tiny"], dtype=torch.float32, device=CPU, seed=5)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
        assert a.isfinite().all(), name
    assert not torch.equal(first.layers[0].attention.qkv.weight, other.layers[0].attention.qkv.weight)
    norms = [m.weight for m in first.modules() if type(m).__name__ == "RMSNorm"]
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms)
