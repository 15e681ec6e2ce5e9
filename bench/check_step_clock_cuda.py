"""On a GPU: the event step clock (training/engine/step_clock.py) with the engine's lookahead pattern (step n+1
queued before step n is read back) against the host's wall clock around the whole window. Prints the laps and the
two totals; exits 1 when they differ by more than 3% or a lap is shorter than the step's work timed alone.

    python3 bench/check_step_clock_cuda.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.engine.step_clock import EventStepClock  # noqa: E402

STEPS, MATMULS, SIZE = 8, 40, 8192


def work(a: torch.Tensor, b: torch.Tensor) -> None:
    for _ in range(MATMULS):
        torch.mm(a, b, out=a.new_empty(a.shape))


def main() -> int:
    device = torch.device("cuda", 0)
    a, b = (torch.randn(SIZE, SIZE, device=device, dtype=torch.bfloat16) for _ in range(2))
    work(a, b)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    work(a, b)
    torch.cuda.synchronize(device)
    alone = time.perf_counter() - started
    clock, laps, pending = EventStepClock(device), [], None
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(STEPS):
        clock.start()
        work(a, b)
        mark = clock.mark()
        if pending is not None:
            laps.append(clock.lap(pending))
        pending = mark
    laps.append(clock.lap(pending))
    wall = time.perf_counter() - started
    total = sum(laps)
    print(f"one step's work timed alone {alone * 1e3:.2f} ms; laps (ms): {', '.join(f'{x * 1e3:.2f}' for x in laps)}")
    print(f"sum of laps {total:.4f} s, host wall clock {wall:.4f} s, {abs(total / wall - 1):.2%} apart")
    short = [lap for lap in laps if lap < 0.97 * alone]
    return 1 if abs(total / wall - 1) > 0.03 or short else 0


if __name__ == "__main__":
    raise SystemExit(main())
