"""Optimiser choice, LR schedule and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.engine.config import OptimSection
from training.engine.optim import build_optimizer, build_scheduler, clip_gradients, lr_factor, trainable_parameters

CPU = torch.device("cpu")


def test_warmup_then_constant():
    factors = [lr_factor(s, warmup_steps=4, total_steps=10, schedule="constant") for s in range(6)]
    assert factors == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_warmup_then_cosine_to_zero():
    factors = [lr_factor(s, warmup_steps=2, total_steps=10, schedule="cosine") for s in range(11)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert factors[10] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


def test_scheduler_drives_the_optimizer_lr():
    param = nn.Parameter(torch.zeros(3))
    section = OptimSection(lr=1e-3, warmup_steps=2, schedule="cosine")
    optimizer = build_optimizer([param], section, device=CPU)
    scheduler = build_scheduler(optimizer, section, total_steps=4)
    lrs = []
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


def test_adamw_is_torchs_with_the_sections_settings():
    param = nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([param], OptimSection(lr=2e-4, weight_decay=0.1, betas=(0.8, 0.9)), device=CPU)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["fused"]) == (2e-4, 0.1, (0.8, 0.9), None)


def test_adamw8bit_comes_from_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    param = nn.Parameter(torch.randn(4096))
    optimizer = build_optimizer([param], OptimSection(optimizer="adamw8bit"), device=CPU)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    param.grad = torch.randn(4096)
    optimizer.step()


def test_clipping_returns_the_norm_before_clipping():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    assert clip_gradients([a, b], 1.0).item() == pytest.approx(5.0)
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    assert clip_gradients([a, b], 0).item() == pytest.approx(1.0, rel=1e-5)  # 0: measure only
    assert a.grad.norm().item() == pytest.approx(0.6, rel=1e-5)


def test_missing_gradients_and_parameters_are_errors():
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        clip_gradients([nn.Parameter(torch.zeros(2))], 1.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        trainable_parameters(frozen)
