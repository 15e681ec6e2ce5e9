"""Where the GPU waits inside profiled steps: the gaps in which no kernel, copy or memset runs, from a Chrome trace of
torch.profiler, each attributed to the host code that launched the work that ended it.

    python3 bench/trace_gaps.py TRACE.json --steps 2      # or: bench/profile_step.py --gaps

A gap is *host-late* when the work after it was launched only after the GPU had gone idle (the host was behind), and
*device-side* when it was already queued (launch latency, a stream or event wait). Gaps are grouped by the outermost
host operation around the launch (on its thread: the autograd engine runs the backward in its own thread) and by size.
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
SIZES_US = ((5, "< 5 µs"), (50, "5-50 µs"), (500, "50-500 µs"), (float("inf"), "≥ 500 µs"))


@dataclass(frozen=True)
class Gap:
    start_us: float
    end_us: float
    host_late: bool
    outer: str  # outermost host op around the launch of the work after the gap
    inner: str  # innermost host op around it

    @property
    def us(self) -> float:
        return self.end_us - self.start_us


class HostOps:
    """The CPU ops of one thread, for 'which ops enclose time t'."""

    def __init__(self, ops: list[dict]) -> None:
        self.ops = sorted(ops, key=lambda e: (e["ts"], -e.get("dur", 0)))
        self.starts = [e["ts"] for e in self.ops]
        self.top, stack = [], []
        for op in self.ops:
            end = op["ts"] + op.get("dur", 0)
            while stack and stack[-1] < op["ts"]:
                stack.pop()
            if not stack:
                self.top.append(op)
            stack.append(end)
        self.top_starts = [e["ts"] for e in self.top]

    def around(self, t: float) -> tuple[str, str]:
        index = bisect.bisect_right(self.top_starts, t) - 1
        outer = self.top[index] if index >= 0 and _contains(self.top[index], t) else None
        inner = None
        for op in reversed(
            self.ops[max(0, bisect.bisect_right(self.starts, t) - 400) : bisect.bisect_right(self.starts, t)]
        ):
            if _contains(op, t) and (inner is None or op.get("dur", 0) < inner.get("dur", 0)):
                inner = op
        return (outer or {}).get("name", "(no host op)"), (inner or {}).get("name", "(no host op)")


def _contains(op: dict, t: float) -> bool:
    return op["ts"] <= t <= op["ts"] + op.get("dur", 0)


def find_gaps(events: list[dict], *, min_us: float = 0.0) -> list[Gap]:
    """Every interval in which the GPU runs nothing, between its first and last work in the trace."""
    work = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES), key=lambda e: e["ts"]
    )
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }
    threads: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            threads[(e.get("pid"), e.get("tid"))].append(e)
    host = {key: HostOps(ops) for key, ops in threads.items()}
    gaps, busy_until = [], None
    for item in work:
        if busy_until is not None and item["ts"] - busy_until > min_us:
            launch = launches.get(item.get("args", {}).get("correlation"))
            late = launch is not None and launch["ts"] > busy_until
            ops = host.get((launch.get("pid"), launch.get("tid"))) if launch else None
            outer, inner = ops.around(launch["ts"]) if ops else ("(unknown launch)", "(unknown launch)")
            gaps.append(Gap(start_us=busy_until, end_us=item["ts"], host_late=late, outer=outer, inner=inner))
        end = item["ts"] + item.get("dur", 0)
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def report(gaps: list[Gap], *, steps: int, top: int = 15) -> str:
    total = sum(g.us for g in gaps)
    late = sum(g.us for g in gaps if g.host_late)
    lines = [
        f"GPU idle {total / steps / 1e3:.2f} ms per step in {len(gaps) / steps:.0f} gaps: host-late "
        f"{late / steps / 1e3:.2f} ms, device-side {(total - late) / steps / 1e3:.2f} ms",
        "| gap size | gaps per step | ms per step |",
        "|---|---|---|",
    ]
    low = 0.0
    for high, label in SIZES_US:
        members = [g for g in gaps if low <= g.us < high]
        lines.append(f"| {label} | {len(members) / steps:.0f} | {sum(g.us for g in members) / steps / 1e3:.2f} |")
        low = high
    for title, key in (("outermost host op at the launch", "outer"), ("innermost host op at the launch", "inner")):
        grouped: dict[tuple[str, bool], list[Gap]] = defaultdict(list)
        for gap in gaps:
            grouped[(getattr(gap, key), gap.host_late)].append(gap)
        lines += [f"\nby {title} (top {top}):", "| ms per step | gaps per step | kind | op |", "|---|---|---|---|"]
        ranked = sorted(grouped.items(), key=lambda kv: -sum(g.us for g in kv[1]))[:top]
        for (name, host_late), members in ranked:
            kind = "host-late" if host_late else "device-side"
            ms = sum(g.us for g in members) / steps / 1e3
            lines.append(f"| {ms:.2f} | {len(members) / steps:.0f} | {kind} | {name[:100]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps in the trace (figures are per step)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    events = json.loads(args.trace.read_text())["traceEvents"]
    print(report(find_gaps(events), steps=args.steps, top=args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
