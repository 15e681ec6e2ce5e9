"""On a GPU: what one LoRA save costs the training thread. A float32 r128 adapter of Z-Image's shapes on every target
(30 main blocks and 4 refiner blocks × qkv, out, w1, w2, w3: 0.28 G parameters) is staged for its bf16 file the old
way (a blocking ``.to("cpu", bf16)``, which PyTorch casts on the CPU, then a clone) and the current way
(`lora_file.stage_lora_file`: cast on the GPU, one device-to-host copy), then written (atomic, fsynced). Each time is
taken after ``torch.cuda.synchronize()``; the best of ``--repeats``. Since issue 12 the write runs in a background
thread, so the staging is what the training thread waits for.

    python3 bench/bench_result_save.py --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.model.lora import LoraSettings  # noqa: E402
from training.model.lora_file import stage_lora_file  # noqa: E402

DIM, HIDDEN, RANK = 3840, 10240, 128
BLOCKS = [f"layers.{i}" for i in range(30)] + [
    f"{kind}.{i}" for kind in ("noise_refiner", "context_refiner") for i in (0, 1)
]
LINEARS = {  # name: (in, out)
    "attention.qkv": (DIM, 3 * DIM),
    "attention.out": (DIM, DIM),
    "feed_forward.w1": (DIM, HIDDEN),
    "feed_forward.w2": (HIDDEN, DIM),
    "feed_forward.w3": (DIM, HIDDEN),
}


def adapter_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {}
    for block in BLOCKS:
        for linear, (fan_in, fan_out) in LINEARS.items():
            state[f"{block}.{linear}.lora_A.weight"] = torch.randn(RANK, fan_in, device=device)
            state[f"{block}.{linear}.lora_B.weight"] = torch.randn(fan_out, RANK, device=device)
    return state


def timed(work) -> tuple[float, object]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = work()
    torch.cuda.synchronize()
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    state = adapter_state(torch.device("cuda"))
    settings = LoraSettings(rank=RANK, targets="attention+ffn+refiners")
    params = sum(t.numel() for t in state.values())
    old = lambda: {k: t.detach().to("cpu", torch.bfloat16).contiguous().clone() for k, t in state.items()}  # noqa: E731
    new = lambda: stage_lora_file(state, settings)  # noqa: E731
    rows = {"old staging (CPU cast)": [], "stage_lora_file (GPU cast)": [], "write (atomic, fsync)": []}
    with tempfile.TemporaryDirectory(prefix="whetstone-save-") as folder:
        for _ in range(args.repeats):
            rows["old staging (CPU cast)"].append(timed(old)[0])
            seconds, staged = timed(new)
            rows["stage_lora_file (GPU cast)"].append(seconds)
            started = time.perf_counter()
            staged.write(Path(folder) / "lora.safetensors")
            rows["write (atomic, fsync)"].append(time.perf_counter() - started)
        size = (Path(folder) / "lora.safetensors").stat().st_size
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {params / 1e9:.3f} G parameters, file {size / 1e9:.2f} GB"
    )
    print("| part | best s | all s |")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {min(seconds):.3f} | {', '.join(f'{s:.3f}' for s in seconds)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
