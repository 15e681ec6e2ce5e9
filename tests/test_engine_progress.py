"""The terminal's progress line during `train`: a redrawn bar on a terminal, periodic log lines elsewhere, rank 0 only."""

from __future__ import annotations

import copy
import io
import logging
import time

from test_engine_runs import tiny_config

from training.engine.config import TrainConfig
from training.engine.progress import CLEAR_LINE, Progress, format_duration
from training.engine.trainer import run_training


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def metrics(loss: float = 0.5, img_per_s: float = 4.0) -> dict:
    return {"loss": loss, "img_per_s": img_per_s}


def test_terminal_bar_shows_step_loss_rate_eta_and_the_phase():
    clock, stream = Clock(), Terminal()
    progress = Progress(100, stream=stream, clock=clock, tick_s=None)
    assert progress.terminal
    progress.phase("loading weights")
    clock.now += 12
    progress._draw()  # what the ticker does every TICK_S
    assert stream.getvalue().endswith("] loading weights… 12 s")
    progress.step(1, metrics())  # the first step (compile) is left out of the ETA
    clock.now += 2
    progress.step(11, metrics(loss=0.25, img_per_s=8.0))  # 10 steps in 2 s: 89 steps left = 17.8 s
    line = stream.getvalue().rsplit(CLEAR_LINE, 1)[1]
    assert line == "[██░░░░░░░░░░░░░░░░░░] step 11/100 (11%) | loss 0.2500 | 8.00 img/s | ETA 18s"
    progress.phase("saving")
    assert stream.getvalue().endswith("| ETA 18s | saving… 0 s")
    progress.close()
    assert stream.getvalue().endswith("\n")


def test_a_log_line_clears_the_bar_first():
    stream = Terminal()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = Progress(10, stream=stream, tick_s=None)
        progress.step(1, metrics())
        logging.getLogger("training.test").warning("a message")
        progress.close()
    finally:
        root.removeHandler(handler)
    assert f"ETA --{CLEAR_LINE}a message\n" in stream.getvalue()
    assert not handler.filters  # close() took its filter off again


def test_ascii_bar_where_the_terminal_cannot_show_blocks():
    class AsciiTerminal(Terminal):
        encoding = "ascii"

    stream = AsciiTerminal()
    progress = Progress(4, stream=stream, tick_s=None)
    progress.step(2, metrics())
    assert "[##########----------] step 2/4" in stream.getvalue()


def test_without_a_terminal_plain_lines_every_ten_seconds_and_at_the_ends(caplog):
    clock, stream = Clock(), io.StringIO()
    progress = Progress(50, stream=stream, clock=clock, tick_s=None)
    assert not progress.terminal
    with caplog.at_level(logging.INFO, logger="training.engine.progress"):
        progress.phase("compiling (first step)")
        for step in range(1, 51):
            clock.now += 1
            progress.step(step, metrics())
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "compiling (first step)..."
    steps = [line.split("/")[0] for line in lines[1:]]
    assert steps == ["step 1", "step 11", "step 21", "step 31", "step 41", "step 50"]
    assert lines[2] == "step 11/50 (22%) | loss 0.5000 | 4.00 img/s | ETA 39s"
    assert stream.getvalue() == ""  # the lines go through logging, nothing is drawn


def test_other_ranks_show_nothing(caplog):
    stream = Terminal()
    with caplog.at_level(logging.INFO):
        progress = Progress(10, rank=1, stream=stream, tick_s=None)
        progress.phase("loading weights")
        progress.step(1, metrics())
        progress.close()
    assert stream.getvalue() == "" and not caplog.records


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 3600, 90061)] == [
        "0s",
        "59s",
        "1m01s",
        "59m59s",
        "1h00m",
        "25h01m",
    ]


def test_a_run_reports_its_phases_and_steps(tmp_path, caplog):
    """A real run without a terminal (pytest captures stderr): phases and the first and last step as log lines;
    an unset save_every on a short run saves at the end only, and says why."""
    config = tiny_config(tmp_path / "run", steps=3, micro_batch=1, grad_accum=1, save_state=False)
    with caplog.at_level(logging.INFO):
        assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    text = caplog.text
    assert "building the model..." in text and "first step..." in text
    assert "step 1/3 (33%) | loss" in text and "step 3/3 (100%)" in text and "saving..." in text
    assert "LoRA and checkpoint saves: at the end only (run.save_every unset; 3 steps are cheap to redo)" in text


def test_the_ticker_counts_a_silent_phase_up():
    """Loading weights or compiling prints nothing for a while: the line still shows the seconds passing."""
    clock, stream = Clock(), Terminal()
    progress = Progress(10, stream=stream, clock=clock, tick_s=0.01)
    try:
        progress.phase("compiling (first step)")
        clock.now += 42
        deadline = time.monotonic() + 10
        while "compiling (first step)… 42 s" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        progress.close()
    assert "compiling (first step)… 42 s" in stream.getvalue()
