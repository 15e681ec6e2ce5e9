"""On a GPU: one QLoRA layer at Z-Image's shapes (M = 4,608 tokens, r = 128, NF4 bf16 base, float32 adapter, bf16
autocast), peft's path over `FrozenNF4Linear` against `lora_concat`'s one GEMM over [W | B], both compiled. Prints
a shape a line: whether the beside operators' self-check passed, the compiled concat layer against its eager self
(the relative difference of the output and the x, A and B gradients: Inductor may fuse the backward's add in another
order), how many [N, K + r]-sized buffers each compiled graph allocates (forward and backward 1 each: the kernels
write [W | B] in place; more: Inductor copies it), and the forward + backward time of each path (CUDA events, after
warm-up).

    python3 bench/check_lora_concat_nf4_cuda.py
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_nf4_dequant import timed  # noqa: E402

from training.engine import nf4_kernel  # noqa: E402
from training.engine.lora_concat import apply_lora_concat  # noqa: E402
from training.engine.nf4_frozen import convert_nf4_linears  # noqa: E402
from training.engine.quantize import to_nf4  # noqa: E402

SHAPES = ((3840, 11520), (3840, 3840), (3840, 10240), (10240, 3840))  # (in, out): qkv, out, w1 / w3, w2
TOKENS, RANK = 4608, 128


def layer_pair(in_features: int, out_features: int) -> tuple[nn.Module, nn.Module]:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16).cuda().requires_grad_(False)
    holder = nn.Sequential(to_nf4(linear, compute_dtype=torch.bfloat16))
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]), holder)
    for name, param in holder.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    convert_nf4_linears([holder])  # as the engine does: peft wraps bitsandbytes' layer, then its base is converted
    holder = holder.cuda()
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
    layer = getattr(model, "_orig_mod", model)[0]
    return out, x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def combined_buffers(code: str, out_features: int, in_features: int) -> int:
    """Allocations of [N, K + r] bf16 in Inductor's generated code."""
    return len(re.findall(rf"empty_strided_cuda\(\({out_features}, {in_features + RANK}\)", code))


def main() -> int:
    from torch._inductor.utils import run_and_get_code

    print("beside operators' self-check:", nf4_kernel.available(torch.bfloat16, beside=True))
    for in_features, out_features in SHAPES:
        torch._dynamo.reset()
        peft_layer, concat = layer_pair(in_features, out_features)
        x = torch.randn(TOKENS, in_features, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(TOKENS, out_features, device="cuda", dtype=torch.bfloat16)
        eager = step(concat, x, grad)
        compiled = torch.compile(concat)
        got, codes = run_and_get_code(lambda: step(compiled, x, grad))  # noqa: B023
        differences = [f"{((a.float() - b.float()).norm() / b.float().norm()).item():.1e}" for a, b in zip(got, eager)]
        buffers = [combined_buffers(code, out_features, in_features) for code in codes]
        peft_compiled = torch.compile(peft_layer)
        times = [timed(lambda m=m: step(m, x, grad), repeats=20) for m in (peft_compiled, compiled)]  # noqa: B023
        print(
            f"in {in_features} out {out_features}: compiled vs eager (out, x, A, B grads) {differences}; "
            f"[N, K+r] buffers a graph {buffers}; fwd+bwd peft {times[0] * 1e3:.3f} ms, concat {times[1] * 1e3:.3f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
