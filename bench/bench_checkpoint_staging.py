"""On a GPU: four ways to get a checkpoint's training state (an r128 LoRA of Z-Image's shapes with AdamW's two
moments, float32: 1,020 tensors, 3.4 GB) to the host, each timed as the training thread feels it while a stand-in
for training (a loop of bf16 GEMMs) keeps the GPU busy on the training stream. Issue 12: the step after a checkpoint
took 2.0 s more at the first save and 0.64–0.70 s more at later ones; page-locked buffers cut the later ones to
0.28 s but cost 4.3–4.8 s once, so they were dropped. This chooses the next design from numbers:

- ``plain``: what the checkpointer does, a blocking ``.to("cpu")`` per tensor into fresh pageable memory;
- ``pageable-reused``: the same into pageable buffers allocated (and touched) once and reused;
- ``pinned-reused``: non-blocking copies into page-locked buffers allocated once (their allocation timed apart);
- ``device-snapshot``: a device-to-device copy on the training stream (3.4 GB more GPU memory while it lasts), then
  a thread copies it to the host on a stream of its own while training goes on.

For each: the training thread's stall (host seconds until it may launch the next step), how much later the next
step ends than it would without the save (the GPU's clock, from the save's start: the stall, the copies' share of
the training stream and of memory bandwidth), and the seconds until the host copy is complete. Each figure is the median of ``--repeats`` saves after one warm-up save; every time is read after
``torch.cuda.synchronize()`` or an event's ``synchronize()``.

    python3 bench/bench_checkpoint_staging.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_result_save import adapter_state  # noqa: E402

GEMM = 8192  # the stand-in's matrix size: ~1.1 TFLOP a call, ~1.5 ms on an H200


def training_state(device: torch.device) -> list[torch.Tensor]:
    """The adapter's float32 weights and AdamW's exp_avg and exp_avg_sq for each (1,020 tensors)."""
    weights = list(adapter_state(device).values())
    return weights + [torch.randn_like(w) for w in weights] + [torch.rand_like(w) for w in weights]


class Training:
    """A stand-in for training on the current stream: ``steps`` bf16 GEMMs; `run` returns their GPU seconds."""

    def __init__(self, device: torch.device, steps: int) -> None:
        self.a = torch.randn(GEMM, GEMM, device=device, dtype=torch.bfloat16)
        self.steps = steps

    def launch(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.steps):
            torch.mm(self.a, self.a)
        end.record()
        return start, end


def plain(state, _buffers):
    return [t.to("cpu") for t in state], None


def pageable_reused(state, buffers):
    for buffer, tensor in zip(buffers["pageable"], state):
        buffer.copy_(tensor)
    return buffers["pageable"], None


def pinned_reused(state, buffers):
    for buffer, tensor in zip(buffers["pinned"], state):
        buffer.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return buffers["pinned"], done.synchronize


def device_snapshot(state, buffers):
    snapshot = [t.clone() for t in state]
    cloned = torch.cuda.Event()
    cloned.record()
    finished = threading.Event()

    def copy_out():
        stream = torch.cuda.Stream()
        stream.wait_event(cloned)
        with torch.cuda.stream(stream):
            for buffer, tensor in zip(buffers["pageable"], snapshot):
                buffer.copy_(tensor)  # pageable: returns once the copy is done
        snapshot.clear()
        finished.set()

    threading.Thread(target=copy_out, daemon=True).start()
    return buffers["pageable"], finished.wait


WAYS = {"plain": plain, "pageable-reused": pageable_reused, "pinned-reused": pinned_reused,
        "device-snapshot": device_snapshot}  # fmt: skip


def one_save(way, state, buffers, training: Training) -> dict:
    torch.cuda.synchronize()
    alone_start, alone_end = training.launch()  # the stand-in alone, for its undisturbed GPU time
    torch.cuda.synchronize()
    alone = alone_start.elapsed_time(alone_end) / 1e3
    save_start = torch.cuda.Event(enable_timing=True)
    save_start.record()
    started = time.perf_counter()
    _, complete = way(state, buffers)
    stall = time.perf_counter() - started
    _, train_end = training.launch()  # the next step, queued as soon as the host may
    train_end.synchronize()
    if complete is not None:
        complete()
    done = time.perf_counter() - started
    torch.cuda.synchronize()
    delay = save_start.elapsed_time(train_end) / 1e3 - alone  # the save's whole cost to training, on the GPU's clock
    return {"stall_s": stall, "delay_s": delay, "complete_s": done}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gemms", type=int, default=400, help="GEMMs in the stand-in step (~0.6 s on an H200)")
    args = parser.parse_args()
    device = torch.device("cuda")
    state = training_state(device)
    nbytes = sum(t.numel() * t.element_size() for t in state)
    started = time.perf_counter()
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in state]
    pin_s = time.perf_counter() - started
    started = time.perf_counter()
    pageable = [torch.empty(t.shape, dtype=t.dtype).fill_(0) for t in state]
    touch_s = time.perf_counter() - started
    buffers = {"pinned": pinned, "pageable": pageable}
    training = Training(device, args.gemms)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {len(state)} tensors, {nbytes / 1e9:.2f} GB")
    print(f"page-locked allocation once: {pin_s:.2f} s; pageable allocation and first touch once: {touch_s:.2f} s")
    print("| way | training thread's stall s | the next step's end delayed by s | host copy complete s |")
    print("|---|---|---|---|")
    for name, way in WAYS.items():
        one_save(way, state, buffers, training)  # warm-up
        runs = [one_save(way, state, buffers, training) for _ in range(args.repeats)]
        medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| {name} | {medians['stall_s']:.3f} | {medians['delay_s']:.3f} | {medians['complete_s']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
