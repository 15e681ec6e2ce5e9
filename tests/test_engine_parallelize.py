"""Activation checkpointing, per-block compile and the guards of FP8 / FSDP offload (CPU; DDP and FSDP2 themselves
are exercised by the 2-process runs in test_engine_runs.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.engine.build import random_model
from training.engine.distributed import DistInfo
from training.engine.parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_fp8,
    apply_fsdp,
    clean_name,
    gradient_sync,
    unwrap,
)
from training.model.config import PRESETS
from training.model.lora import LoraSettings, attach_lora, lora_state_dict

CPU = torch.device("cpu")


def lora_model(seed: int = 0) -> nn.Module:
    model = random_model(PRESETS["tiny"], dtype=torch.float32, device=CPU, seed=seed)
    torch.manual_seed(1)
    attach_lora(model, LoraSettings(rank=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # B starts at zero; make the LoRA path matter for the gradient check
    return model


def run(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 16, 8, 8, generator=generator)
    features = torch.randn(2, 7, 32, generator=generator)
    out = model(latents, torch.tensor([0.3, 0.8]), features, torch.tensor([7, 4]))
    out.square().mean().backward()
    grads = {clean_name(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def test_checkpointing_changes_nothing_but_memory():
    plain, wrapped = lora_model(), lora_model()
    keys = list(plain.state_dict())
    apply_activation_checkpointing(wrapped, 2)
    assert list(wrapped.state_dict()) == keys  # clean state-dict names: checkpoints and files are unaffected
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    assert lora_state_dict(plain).keys() == {clean_name(k) for k in lora_state_dict(wrapped)}
    out, grads = run(plain)
    out_ckpt, grads_ckpt = run(wrapped)
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7)


def test_checkpoint_depth_beyond_the_model_is_refused():
    with pytest.raises(ValueError, match="checkpoint_depth=3 exceeds"):
        apply_activation_checkpointing(lora_model(), 3)


def test_compiled_checkpointed_lora_blocks_match_eager():
    """Dynamo traces every block (LoRA via peft, checkpoint wrapper); aot_eager keeps CPU compile time small."""
    torch._dynamo.reset()
    eager, compiled = lora_model(), lora_model()
    apply_activation_checkpointing(compiled, 1)
    apply_compile(compiled, backend="aot_eager")
    out, grads = run(eager)
    out_compiled, grads_compiled = run(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(out_compiled, out, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads_compiled[name], grads[name], rtol=1e-5, atol=1e-6)


def test_fp8_and_cpu_offload_say_why_they_cannot_run_here():
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU, backend="gloo")
    with pytest.raises(ValueError, match="run.fp8 is on but FP8 training needs a CUDA GPU"):
        apply_fp8(lora_model(), mode="lora", device=CPU)
    with pytest.raises(ValueError, match="fsdp_cpu_offload"):
        apply_fsdp(lora_model(), info, param_dtype=torch.float32, cpu_offload=True)


def test_plain_module_needs_no_sync_context():
    model = lora_model()
    assert unwrap(model) is model
    with gradient_sync(model, sync=False):
        pass
