"""The pack progress display: a bar with rate and ETA on a terminal, throttled log lines elsewhere."""

from __future__ import annotations

import io
import logging

from training.data.progress import ProgressDisplay, format_duration


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_terminal_bar_shows_rate_and_eta_of_this_run_only():
    stream, clock = FakeTTY(), Clock()
    display = ProgressDisplay("pack", "img", stream=stream, clock=clock)
    display(40, 100)  # resumed at 40: the rate counts from here
    clock.now += 10
    display(60, 100)  # 20 images in 10 s -> 2 img/s, 40 left -> 20 s
    assert stream.getvalue().endswith("\rpack [################............] 60/100 2.00 img/s ETA 20s")
    clock.now += 0.05
    display(61, 100)  # throttled: drawn at most every 0.2 s
    assert "61/100" not in stream.getvalue()
    clock.now += 0.05
    display(100, 100)  # the last update always shows
    assert "100/100" in stream.getvalue()
    display.close()
    assert stream.getvalue().endswith("\n")


def test_log_lines_when_not_a_terminal(caplog):
    clock = Clock()
    display = ProgressDisplay("pack", "img", stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="training.data.progress"):
        display(0, 3)
        clock.now += 1
        display(1, 3)  # within the 15 s interval: no line
        clock.now += 1
        display(3, 3)
    assert [r.getMessage() for r in caplog.records] == [
        "pack [............................] 0/3 - img/s ETA ?",
        "pack [############################] 3/3 1.50 img/s ETA 0s",
    ]
    assert format_duration(3725) == "1h02m" and format_duration(75) == "1m15s"
