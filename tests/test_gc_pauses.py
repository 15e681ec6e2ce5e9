"""Each step's event says how long Python's garbage collector paused training (issue 12: an unexplained 0.83 s step)."""

from __future__ import annotations

import copy
import gc
import logging

from test_engine_runs import tiny_config

import training.engine.trainer as trainer_module
from training.engine.config import TrainConfig
from training.engine.gc_pauses import GcPauses
from training.engine.trainer import run_training
from training.run.events import read_events


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_pauses_are_summed_between_takes_with_the_oldest_generation(caplog):
    clock = FakeClock()
    with GcPauses(clock=clock) as pauses:
        callback = gc.callbacks[-1]
        for generation, seconds in ((0, 0.01), (2, 0.3), (1, 0.02)):
            callback("start", {"generation": generation})
            clock.now += seconds
            callback("stop", {"generation": generation, "collected": 0, "uncollectable": 0})
        with caplog.at_level(logging.INFO, logger="training.engine.trainer"):
            taken = pauses.take(7)
        assert taken["gc_s"] == 0.01 + 0.3 + 0.02 and taken["gc_generation"] == 2
        assert "step 7: Python's garbage collector paused training for 0.33 s (generation 2)" in caplog.text
        assert pauses.take(8) == {"gc_s": 0.0, "gc_generation": None}
        callback("stop", {"generation": 1})  # a collection already running when entered: not counted
        assert pauses.take(9)["gc_s"] == 0.0
    assert callback not in gc.callbacks  # removed on exit


def test_a_step_with_a_full_collection_says_so_in_its_event(tmp_path, monkeypatch):
    original = trainer_module.Trainer._micro_step
    collected_at = {}

    def micro_step(self, micro, shape):
        if self.step == 1 and micro == 0:  # the second step
            gc.collect(2)
            collected_at["step"] = self.step + 1
        return original(self, micro, shape)

    monkeypatch.setattr(trainer_module.Trainer, "_micro_step", micro_step)
    config = tiny_config(tmp_path / "run", steps=3, grad_accum=1, micro_batch=2)
    assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    events = {event["step"]: event for event in read_events(tmp_path / "run")}
    assert collected_at == {"step": 2}
    assert events[2]["gc_generation"] == 2 and 0 < events[2]["gc_s"] < events[2]["step_s"]
    assert all(isinstance(event["gc_s"], float) for event in events.values())


def test_a_run_freezes_what_survives_its_first_step_once(tmp_path, caplog):
    config = tiny_config(tmp_path / "run", steps=3, grad_accum=1, micro_batch=2)
    with caplog.at_level(logging.INFO, logger="training.engine.trainer"):
        assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    assert caplog.text.count("objects alive after the first step (model, compiled graphs) frozen") == 1
    assert gc.get_freeze_count() == 0  # unfrozen when the run ended


def test_objects_alive_after_the_first_step_are_frozen_until_the_run_ends(caplog):
    with caplog.at_level(logging.INFO, logger="training.engine.trainer"), GcPauses() as pauses:
        pauses.freeze_setup()
        assert gc.get_freeze_count() > 0
        assert pauses.take(2)["gc_generation"] == 2  # the collection before the freeze is counted like any other
    assert gc.get_freeze_count() == 0
    assert "objects alive after the first step (model, compiled graphs) frozen in" in caplog.text


def test_objects_frozen_by_someone_else_stay_frozen(caplog):
    gc.freeze()  # e.g. a server that froze its own objects before forking workers
    try:
        frozen = gc.get_freeze_count()
        with caplog.at_level(logging.INFO, logger="training.engine.trainer"), GcPauses() as pauses:
            pauses.freeze_setup()
        assert gc.get_freeze_count() == frozen
        assert f"garbage collector: {frozen} objects were frozen already; not freezing" in caplog.text
    finally:
        gc.unfreeze()
