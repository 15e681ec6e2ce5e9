"""On a GPU: one LoRA layer at Z-Image's shapes (M = 4,608 tokens, r = 128, bf16 base, float32 adapter, bf16
autocast), peft's path against `lora_concat`'s one GEMM, both compiled: the error of each against a float32
reference, and the forward + backward time of each (CUDA events, after warm-up). Prints one line a shape.

    python3 bench/check_lora_concat_cuda.py
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_nf4_dequant import timed  # noqa: E402

from training.engine.lora_concat import apply_lora_concat  # noqa: E402

SHAPES = ((3840, 11520), (3840, 3840), (3840, 10240), (10240, 3840))  # (in, out): qkv, out, w1 / w3, w2
TOKENS, RANK, REPEATS = 4608, 128, 20


def layer_pair(in_features: int, out_features: int) -> tuple[nn.Module, nn.Module]:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(in_features, out_features, bias=False))
    holder[0].weight.data.mul_(0.5)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]), holder)
    for name, param in holder.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    holder = holder.cuda()
    holder[0].base_layer.to(torch.bfloat16)
    concat = copy.deepcopy(holder)
    apply_lora_concat(concat)
    return holder, concat


def step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    for param in model.parameters():
        param.grad = None
    x = x.detach().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.backward(grad)
    layer = model[0]
    return out.float(), x.grad.float(), layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def reference(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    exact = copy.deepcopy(model).float()
    layer = exact[0]
    for param in layer.get_base_layer().parameters():
        param.data = param.data.float()
    x = x.float().detach().requires_grad_(True)
    out = exact(x)
    out.backward(grad.float())
    return out, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).norm() / want.detach().double().norm())


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    for in_features, out_features in SHAPES:
        peft_layer, concat_layer = layer_pair(in_features, out_features)
        x = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(TOKENS, out_features, device="cuda", dtype=torch.bfloat16)
        torch._dynamo.reset()
        peft_step, concat_step = torch.compile(step, dynamic=False), torch.compile(step, dynamic=False)
        pairs = (("peft", peft_step, peft_layer), ("concat", concat_step, concat_layer))
        times = {name: 1000 * timed(functools.partial(fn, model, x, grad), REPEATS) for name, fn, model in pairs}
        print(
            f"{in_features}->{out_features}: peft {times['peft']:.3f} ms, concat {times['concat']:.3f} ms "
            f"({times['peft'] - times['concat']:+.3f} ms a forward + backward)"
        )
        for when in ("before", "after B changed"):  # "after": the forward pre-hook must mirror the new B
            want = reference(peft_layer, x, grad)
            errors = {
                name: [error(g, w) for g, w in zip(fn(model, x, grad), want, strict=True)] for name, fn, model in pairs
            }
            print(
                f"  errors vs float32 {when} (out, grad x, grad A, grad B): "
                + "; ".join(f"{name} " + ", ".join(f"{e:.1e}" for e in errs) for name, errs in errors.items())
            )
            with torch.no_grad():
                for model in (peft_layer, concat_layer):
                    model[0].lora_B["default"].weight.add_(0.05)


if __name__ == "__main__":
    main()
