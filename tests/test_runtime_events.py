"""RunLog and read_events: live-readable lines, tolerant reading, resumed history, atomic status; GracefulStop."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from training.engine.signals import GracefulStop
from training.run.events import EventTail, RunLog, maybe_profile, read_events, read_status, read_summary

HUGE_INT = "9" * 5000  # over Python's 4300-digit limit: json.loads raises ValueError, not JSONDecodeError
DEEP = "[" * 100_000  # deeper than the parser's recursion limit: RecursionError


def test_step_lines_are_readable_live(tmp_path):
    log = RunLog(tmp_path, rank=0, tensorboard=False)
    log.status("starting")
    log.step({"step": 1, "loss": torch.tensor(0.5), "loss_sigma": {"0.0-0.25": 0.4}})
    assert read_events(tmp_path)[0]["loss"] == 0.5  # flushed before close
    log.step({"step": 2, "loss": float("nan")})
    log.status("running", "step 2", step=2)
    log.summary({"steps": 2})
    log.close()
    events = read_events(tmp_path)
    assert [e["step"] for e in events] == [1, 2] and events[1]["loss"] is None
    assert {"time", "elapsed_s"} <= events[0].keys()
    assert read_status(tmp_path)["state"] == "running" and read_status(tmp_path)["step"] == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "status.json", "summary.json"]  # no temps


def test_tolerates_half_line_and_resume(tmp_path, caplog):
    with RunLog(tmp_path, rank=0, tensorboard=False) as log:
        for step in (1, 2, 3):
            log.step({"step": step, "loss": 1.0})
    with open(tmp_path / "events.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')  # killed mid-write
    assert [e["step"] for e in read_events(tmp_path)] == [1, 2, 3]
    with RunLog(tmp_path, rank=0, tensorboard=False) as log:  # resumed from a checkpoint at step 2
        log.step({"step": 3, "loss": 0.5})
    assert [(e["step"], e["loss"]) for e in read_events(tmp_path)] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    assert len(read_events(tmp_path, resumed_history=False)) == 4
    assert "skipped 1 line" in caplog.text


def test_hostile_lines_are_skipped_not_raised(tmp_path, caplog):
    """A run folder is untrusted: a step line whose number has more than 4300 digits, or nested deeper than the
    parser can, is skipped as a line that is not JSON (both used to raise out of read_events and EventTail)."""
    with RunLog(tmp_path, rank=0, tensorboard=False) as log:
        log.step({"step": 1, "loss": 1.0})
    with open(tmp_path / "events.jsonl", "a") as handle:
        handle.write('{"step": 2, "loss": ' + HUGE_INT + "}\n" + DEEP + "\n" + '{"step": ' + HUGE_INT + "}\n")
        handle.write('{"step": 3, "loss": 0.5}\n')
    assert [e["step"] for e in read_events(tmp_path)] == [1, 3]
    assert "skipped 3 line" in caplog.text
    tail = EventTail(tmp_path / "events.jsonl")
    assert [e["step"] for e in tail.read_new()] == [1, 3] and tail.bad_lines == 3


@pytest.mark.parametrize(
    "data", [b'{"state": "running", "step": ' + HUGE_INT.encode() + b"}", DEEP.encode(), b"\xff{}"]
)
def test_a_hostile_status_or_summary_is_ignored_with_a_warning(tmp_path, caplog, data):
    (tmp_path / "status.json").write_bytes(data)
    (tmp_path / "summary.json").write_bytes(data)
    assert read_status(tmp_path) is None and read_summary(tmp_path) is None
    assert "not valid JSON" in caplog.text


def test_an_oversized_status_is_not_read_whole(tmp_path, caplog):
    (tmp_path / "status.json").write_text('{"state": "running"}' + " " * (2 << 20))  # valid JSON, megabytes
    assert read_status(tmp_path) is None and "over" in caplog.text


def test_other_ranks_write_nothing(tmp_path):
    with RunLog(tmp_path / "run", rank=1, world_size=2) as log:
        log.step({"step": 1, "loss": 1.0})
        log.status("running")
    assert not (tmp_path / "run").exists()


def test_rejects_bad_values(tmp_path):
    with RunLog(tmp_path, rank=0, tensorboard=False) as log:
        with pytest.raises(ValueError, match="int 'step'"):
            log.step({"loss": 1.0})
        with pytest.raises(ValueError, match="cannot write object"):
            log.step({"step": 1, "x": object()})
        with pytest.raises(ValueError, match="one of"):
            log.status("done")


def test_profile_writes_trace_for_chosen_step(tmp_path):
    for step in (1, 2):
        with maybe_profile(step, (2,), tmp_path):
            torch.ones(8) @ torch.ones(8)
    assert [p.name for p in (tmp_path / "profile").iterdir()] == ["step-000002-rank0.json"]


def test_graceful_stop_with_real_signal():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.should_stop()
        signal.raise_signal(signal.SIGTERM)  # in this thread, before the next line
        assert stop.requested and stop.signal_name == "SIGTERM" and stop.should_stop()
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_interrupts_at_once():
    """Under Python's own SIGINT handler (set here: an earlier test in the same process may leave another one)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with GracefulStop() as stop, pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # in this thread, before the next line
            assert stop.requested
            signal.raise_signal(signal.SIGINT)  # in this thread, before the next line
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_second_signal_under_an_ignoring_handler_does_not_raise():
    """GracefulStop hands the second signal to the disposition it found; an ignored SIGINT stays ignored."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with GracefulStop() as stop:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            assert stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
