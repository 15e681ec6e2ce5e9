"""A run whose loss goes non-finite stops at that step, saves nothing of it and ends 'failed' (CPU, tiny model)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import torch
from safetensors import safe_open
from test_engine_runs import tiny_config

import training.engine.trainer as trainer_module
from training.__main__ import main
from training.engine.checkpoint import Checkpointer
from training.engine.config import TrainConfig
from training.engine.divergence import TrainingDiverged
from training.engine.trainer import run_training
from training.run.events import read_events, read_status

POISONED_STEP = 3  # the first step whose batch is NaN (grad_accum 1: one batch per step)


def poison_batches(monkeypatch, *, from_step: int) -> None:
    """Latents of every batch from ``from_step`` on become NaN (a broken sample / an exploding model)."""
    original = trainer_module.checked  # the trainer's name for feed.checked: every batch passes through it
    seen = {"batches": 0}

    def poisoned(batch):
        batch = original(batch)
        seen["batches"] += 1
        if seen["batches"] >= from_step:
            batch = dataclasses.replace(batch, latents=torch.full_like(batch.latents, float("nan")))
        return batch

    monkeypatch.setattr(trainer_module, "checked", poisoned)


def diverging_config(run_dir) -> dict:
    config = tiny_config(run_dir, micro_batch=2, grad_accum=1, steps=6, save_every=1, checkpoint_depth=0)
    config["data"]["caption_dropout"] = 0.0
    return config


def test_nan_loss_stops_at_its_step_keeps_the_last_good_lora_and_fails(tmp_path, monkeypatch, caplog):
    reference = diverging_config(tmp_path / "reference")
    reference["run"]["steps"] = POISONED_STEP - 1
    assert run_training(TrainConfig.from_dict(copy.deepcopy(reference))) == 0

    config = diverging_config(tmp_path / "run")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    poison_batches(monkeypatch, from_step=POISONED_STEP)
    with caplog.at_level(logging.ERROR):
        assert main(["train", "--config", str(path)]) == 2
    err = caplog.text
    assert f"training stopped: training diverged at step {POISONED_STEP}: loss nan" in err
    assert "Lower optim.lr" in err

    run_dir = tmp_path / "run"
    status = read_status(run_dir)
    assert status["state"] == "failed", status
    assert f"TrainingDiverged: training diverged at step {POISONED_STEP}" in status["message"], status
    assert f"of step {POISONED_STEP - 1} are kept" in status["message"]
    assert [e["step"] for e in read_events(run_dir)] == list(range(1, POISONED_STEP))
    assert Checkpointer(run_dir, rank=0, world_size=1).latest_step() == POISONED_STEP - 1
    lora = run_dir / "lora.safetensors"
    assert lora.read_bytes() == (tmp_path / "reference" / "lora.safetensors").read_bytes()
    with safe_open(str(lora), "pt") as handle:
        assert handle.metadata()["steps"] == str(POISONED_STEP - 1)
        assert all(torch.isfinite(handle.get_tensor(k)).all() for k in handle.keys())
    assert not (run_dir / "summary.json").exists()


def test_nan_in_the_first_step_saves_nothing(tmp_path, monkeypatch):
    poison_batches(monkeypatch, from_step=1)
    config = TrainConfig.from_dict(diverging_config(tmp_path / "run"))
    try:
        run_training(config)
    except TrainingDiverged as error:
        assert "at step 1:" in str(error) and "nothing was saved yet" in str(error)
    else:
        raise AssertionError("a NaN first step trained on")
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    assert Checkpointer(tmp_path / "run", rank=0, world_size=1).latest_step() is None
    assert read_status(tmp_path / "run")["state"] == "failed"
