"""bench/trace_gaps.py on a hand-made trace: the GPU's idle gaps, host-late or device-side, and who launched what."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from trace_gaps import find_gaps, report  # noqa: E402

BACKWARD = "autograd::engine::evaluate_function: CompiledFunctionBackward"


def op(name, ts, dur, tid):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def device(ts, dur, correlation, stream=7):
    return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "pid": 0, "tid": stream,
            "args": {"correlation": correlation}}  # fmt: skip


def launch(ts, correlation, tid):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "pid": 1, "tid": tid,
            "args": {"correlation": correlation}}  # fmt: skip


TRACE = [
    op("Optimizer.step", 0, 8, tid=1),
    op("aten::add", 4, 2, tid=1),
    op(BACKWARD, 20, 20, tid=2),
    op("aten::mm", 24, 3, tid=2),
    device(0, 10, 1),
    launch(5, 2, tid=1),  # queued while kernel 1 ran: the 2 µs gap after it is the device's
    device(12, 8, 2),
    launch(25, 3, tid=2),  # launched 5 µs after the GPU went idle: host-late
    device(30, 10, 3),
    device(35, 10, 4, stream=8),  # overlaps kernel 3 on another stream: no gap
    launch(0, 4, tid=1),
]


def test_gaps_are_found_classified_and_attributed():
    gaps = find_gaps(TRACE)
    assert [(g.start_us, g.end_us, g.host_late) for g in gaps] == [(10, 12, False), (20, 30, True)]
    assert (gaps[0].outer, gaps[0].inner) == ("Optimizer.step", "aten::add")
    assert (gaps[1].outer, gaps[1].inner) == (BACKWARD, "aten::mm")
    text = report(gaps, steps=2)
    assert text.splitlines()[0] == "GPU idle 0.01 ms per step in 1 gaps: host-late 0.01 ms, device-side 0.00 ms"
    assert f"| 0.01 | 0 | host-late | {BACKWARD} |" in text


def test_the_script_reads_a_chrome_trace(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": TRACE}))
    script = Path(__file__).resolve().parents[1] / "bench" / "trace_gaps.py"
    result = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("GPU idle 0.01 ms per step in 2 gaps: host-late 0.01 ms, device-side 0.00 ms")
    assert pytest.approx(12) == sum(g.us for g in find_gaps(TRACE))
