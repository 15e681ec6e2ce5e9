"""Step lookahead (one process): the host queues step n+1 before it reads step n's metrics back, yet every save,
preview and stop sees a model with no step in flight, at the step it names, and the curve equals a run without it."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.test_engine_previews import with_previews, write_features
from tests.test_engine_runs import assert_same_curve, tiny_config, train_in_process
from training.engine import trainer as trainer_module
from training.engine.config import TrainConfig
from training.engine.preview import Previewer
from training.engine.step_clock import step_lookahead
from training.engine.trainer import Trainer, run_training
from training.run.events import read_events, read_status

STEPS = 7


def config_for(run_dir, **run) -> dict:
    config = tiny_config(run_dir, micro_batch=2, grad_accum=1, **run)
    config["run"]["steps"] = STEPS
    config["optim"] = {"lr": 1e-3}
    return config


class Recorder:
    """Wraps the trainer's methods to record, at each dispatch, save and preview, how many steps were dispatched
    (``trainer.step``) and how many were read back (``len(trainer.history)``)."""

    def __init__(self, monkeypatch) -> None:
        self.dispatches, self.saves, self.previews = [], [], []
        dispatch, save, sample = Trainer.dispatch_step, Trainer.save, Previewer.sample
        recorder = self

        def recording_dispatch(trainer, **kwargs):
            recorder.dispatches.append((trainer.step, len(trainer.history)))
            return dispatch(trainer, **kwargs)

        def recording_save(trainer, **kwargs):
            recorder.saves.append((trainer.step, len(trainer.history)))
            return save(trainer, **kwargs)

        def recording_sample(previewer, step, model):
            recorder.previews.append(step)
            return sample(previewer, step, model)

        monkeypatch.setattr(Trainer, "dispatch_step", recording_dispatch)
        monkeypatch.setattr(Trainer, "save", recording_save)
        monkeypatch.setattr(Previewer, "sample", recording_sample)


@pytest.fixture(autouse=True)
def lookahead_on_cpu(monkeypatch):
    """The CPU runs each kernel as it is called, so the engine looks ahead only on CUDA; the loop's logic is the
    same on any device, and these tests turn it on here."""
    monkeypatch.setattr(trainer_module, "step_lookahead", lambda device, world_size: (True, "test"))


def test_one_cuda_process_looks_ahead_and_ranks_or_cpus_do_not():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert step_lookahead(cuda, 1)[0] is True
    enabled, reason = step_lookahead(cuda, 2)
    assert enabled is False and "stop" in reason
    assert step_lookahead(cpu, 1)[0] is False


def test_the_next_step_is_queued_before_this_one_is_read_back(tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    events = train_in_process(config_for(tmp_path / "run", save_every=3))
    assert [e["step"] for e in events] == list(range(1, STEPS + 1))
    # step 2 is dispatched with step 1 unread; step 4 only after step 3 (a save) was read back
    assert recorder.dispatches == [(0, 0), (1, 0), (2, 1), (3, 3), (4, 3), (5, 4), (6, 6)]
    assert recorder.saves == [(3, 3), (6, 6), (7, 7)]  # every save: no step in flight, all read back


def test_previews_see_the_model_at_their_step(tmp_path, monkeypatch):
    features = tmp_path / "prompts.safetensors"
    write_features(features)
    recorder = Recorder(monkeypatch)
    train_in_process(with_previews(config_for(tmp_path / "run"), features, every=2))
    assert recorder.previews == [0, 2, 4, 6, 7]
    dispatched_after = {step + 1: read for step, read in recorder.dispatches}
    assert all(dispatched_after[step + 1] == step for step in (2, 4, 6))  # step n+1 waited for step n's read back


def test_the_curve_and_the_result_equal_a_run_without_lookahead(tmp_path, monkeypatch):
    config = config_for(tmp_path / "ahead", save_every=4)
    ahead = train_in_process(config)
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "step_lookahead", lambda device, world_size: (False, "test"))
        recorder = Recorder(patch)
        settled = train_in_process(config_for(tmp_path / "settled", save_every=4))
        assert all(step == read for step, read in recorder.dispatches)  # really without lookahead
    assert_same_curve(ahead, settled, rel=0)
    ahead_file = (tmp_path / "ahead" / "lora.safetensors").read_bytes()
    assert ahead_file == (tmp_path / "settled" / "lora.safetensors").read_bytes()


def test_a_stop_request_stops_at_the_step_that_saw_it(tmp_path, monkeypatch):
    dispatch = Trainer.dispatch_step

    def stopping(trainer, *, stop_requested=False):
        return dispatch(trainer, stop_requested=stop_requested or trainer.step + 1 == 3)

    monkeypatch.setattr(Trainer, "dispatch_step", stopping)
    config = config_for(tmp_path / "run")
    assert run_training(TrainConfig.from_dict(copy.deepcopy(config))) == 0
    assert read_status(tmp_path / "run")["state"] == "stopped"
    assert [e["step"] for e in read_events(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()


@pytest.mark.parametrize("poisoned", [2, STEPS])
def test_a_diverged_step_read_back_late_still_stops_the_run_unsaved(tmp_path, monkeypatch, poisoned):
    """Step 2's loss is read back after step 3 is queued: the run fails naming step 2 and saves nothing of it."""
    metrics = Trainer.step_metrics

    def poisoning(trainer, dispatched):
        values = metrics(trainer, dispatched)
        return values | {"loss": float("nan")} if dispatched.number == poisoned else values

    monkeypatch.setattr(Trainer, "step_metrics", poisoning)
    config = config_for(tmp_path / "run", save_every=5)
    with pytest.raises(trainer_module.TrainingDiverged, match=f"at step {poisoned}:"):
        run_training(TrainConfig.from_dict(copy.deepcopy(config)))
    assert read_status(tmp_path / "run")["state"] == "failed"
    assert [e["step"] for e in read_events(tmp_path / "run") if "loss" in e] == list(range(1, poisoned))
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved == (["step-000005"] if poisoned > 5 else [])
