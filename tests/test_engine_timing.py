"""The step timer's contract: a step lasts until the device has finished it, and benches check it against the wall.

The CPU has no asynchronous device, so the tests stand one in: a `wait_for_device` that sleeps, as a CUDA
synchronize does while queued kernels finish after the host has dispatched the whole step.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from training.engine import trainer as trainer_module
from training.engine.config import TrainConfig
from training.engine.step_clock import StepClock
from training.engine.timing import TimingMismatch, window_rate
from training.engine.trainer import run_training
from training.run.events import read_events

DEVICE_TAIL_S = 0.15  # queued device work that finishes after the host has dispatched the step


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lap_waits_for_the_device_before_reading_the_clock():
    clock = FakeClock()

    def wait_for_device():
        clock.now += 0.25  # the device finishes 0.25 s after the host's last launch

    timer = StepClock(wait_for_device, clock=clock)
    timer.start()
    clock.now += 0.1  # host-side dispatch of the step
    assert timer.lap() == pytest.approx(0.35)


def test_laps_are_chained_so_time_between_steps_is_counted():
    clock = FakeClock()
    timer = StepClock(lambda: None, clock=clock)
    timer.start()
    clock.now += 1.0
    assert timer.lap() == pytest.approx(1.0)
    clock.now += 0.5  # logging and a checkpoint's staging between steps
    timer.start()  # a later start does not move the mark
    clock.now += 1.0
    assert timer.lap() == pytest.approx(1.5)
    timer.reset()
    timer.start()
    clock.now += 2.0
    assert timer.lap() == pytest.approx(2.0)


def test_lap_before_start_is_an_error():
    with pytest.raises(RuntimeError, match="before start"):
        StepClock(lambda: None).lap()


def _events(step_s: list[float], gaps: list[float], images: int = 4) -> list[dict]:
    events, now = [], 1000.0
    for step, (seconds, gap) in enumerate(zip(step_s, gaps, strict=True), start=1):
        now += gap
        events.append({"step": step, "time": now, "step_s": seconds, "img_per_s": images / seconds})
    return events


def test_window_rate_is_the_wall_clock_rate():
    events = _events([0.5, 0.2, 0.2, 0.2], [0.5, 0.2, 0.2, 0.2])
    rate = window_rate(events, warmup=1)
    assert rate.steps == 3
    assert rate.img_per_s == pytest.approx(12 / 0.6)
    assert rate.disagreement == pytest.approx(0.0, abs=1e-9)


def test_window_rate_refuses_a_timer_that_stops_before_the_device():
    # the last wave's defect: 0.19 s counted per step while the user waited 0.255 s
    events = _events([0.5, 0.19, 0.19, 0.19], [0.5, 0.255, 0.255, 0.255])
    with pytest.raises(TimingMismatch, match="wall clock"):
        window_rate(events, warmup=1)


def test_window_rate_needs_a_start_event():
    with pytest.raises(ValueError, match="warmup"):
        window_rate(_events([0.2], [0.2]), warmup=0)
    with pytest.raises(ValueError, match="more than"):
        window_rate(_events([0.2, 0.2], [0.2, 0.2]), warmup=2)


def test_engine_step_time_counts_device_work_finished_after_dispatch(tmp_path: Path, monkeypatch):
    """A whole run whose 'device' finishes each step DEVICE_TAIL_S after the host: every step_s includes it, and
    the events' wall-clock gaps agree with the step times (what the benches check)."""

    def slow_device_waiter(device):
        return lambda: time.sleep(DEVICE_TAIL_S)

    monkeypatch.setattr(trainer_module, "device_waiter", slow_device_waiter)
    config = TrainConfig.from_dict(
        {
            "mode": "lora",
            "run": {"output_dir": str(tmp_path / "run"), "steps": 5, "micro_batch": 2, "save_state": False},
            "model": {"preset": "tiny", "dtype": "fp32"},
            "lora": {"rank": 4},
            "data": {"synthetic": True, "resolution": 64, "caption_tokens": 16},
        }
    )
    assert run_training(config) == 0
    events = [e for e in read_events(tmp_path / "run") if "step_s" in e]
    assert len(events) == 5
    assert all(e["step_s"] >= DEVICE_TAIL_S for e in events)
    assert all(e["img_per_s"] <= 2 / DEVICE_TAIL_S for e in events)
    rate = window_rate(events, warmup=1)
    assert rate.disagreement < 0.03
