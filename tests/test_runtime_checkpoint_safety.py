"""Checkpoints from an untrusted run folder (issue #13): nothing is unpickled, a pickle planted anywhere never runs,
an earlier pickle-based checkpoint is refused with a message; a damaged newest checkpoint falls back to the newest
intact one (saying so), and when none is intact the resume fails naming each step and the way out."""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_runtime_checkpoint import _free_port, _seed_all, _toy, _train
from torch.nn.parallel import DistributedDataParallel

from training.engine.checkpoint import Checkpointer
from training.engine.checkpoint_files import CheckpointDamaged, CheckpointMismatch
from training.engine.config import TrainConfig
from training.engine.trainer import run_training
from training.run.events import read_events, read_status


class _Planted:
    """Unpickling this creates ``marker``: a stand-in for any code a hostile run folder could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Planted(marker)))


def _config(run_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "mode": "lora",
            "run": {"output_dir": str(run_dir), "steps": steps, "save_every": 2, "micro_batch": 2},
            "model": {"preset": "tiny", "dtype": "fp32"},
            "lora": {"rank": 4},
            "data": {"synthetic": True, "resolution": 64, "caption_tokens": 16},
            "optim": {"lr": 1e-3},
        }
    )


def _losses(run_dir: Path) -> list[float]:
    return [event["loss"] for event in read_events(run_dir)]


# ---------------------------------------------------------------------------- no pickle, ever


def test_a_pickle_planted_in_a_checkpoint_never_runs(tmp_path, caplog):
    """The sharer's trick: a resumable run folder whose .metadata (what DCP unpickled) carries code."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert run_training(_config(run, 2)) == 0
    _plant(run / "checkpoints/step-000002/.metadata", marker)
    with caplog.at_level(logging.INFO):
        assert run_training(_config(run, 3)) == 0
    assert not marker.exists()
    assert "resuming at step 2 of 3" in caplog.text
    assert "ignoring files a checkpoint never holds (never read): ['.metadata']" in caplog.text


def test_a_pickle_based_checkpoint_is_refused_unread(tmp_path):
    """A folder in the earlier DCP + torch.save format (as a hostile sharer would make it): refused, never read."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    folder = run / "checkpoints/step-000004"
    folder.mkdir(parents=True)
    _plant(folder / ".metadata", marker)
    _plant(folder / "__0_0.distcp", marker)
    torch.save(
        {"step": 4, "world_size": 1, "rng": {}, "loader": {}, "scheduler": None, "extra": {}}, folder / "rank-00000.pt"
    )
    with pytest.raises(
        ValueError, match=r"pickle-based format \(step-000004: \.metadata, __0_0\.distcp, rank-00000\.pt\)"
    ) as caught:
        run_training(_config(run, 6))
    assert "never loaded: unpickling a file can run any code" in str(caught.value)
    assert "run.resume=false" in str(caught.value)
    assert not marker.exists()
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "rank-00000.pt"]  # untouched


def test_a_save_resume_cycle_unpickles_nothing(tmp_path, monkeypatch, one_rank_group):
    """Every unpickling entry point raises (and is recorded) while a run saves, resumes and continues exactly."""
    calls = []

    def forbidden(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called during a checkpoint round trip")

        return refuse

    class RefusingUnpickler(pickle.Unpickler):  # a class still: modules imported meanwhile may subclass it
        load = forbidden("pickle.Unpickler.load")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")):
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)

    _seed_all(1)
    model, optimizer, scheduler = _toy(0)
    reference = _train(model, optimizer, scheduler, 8, {"position": 0})
    _seed_all(1)
    model, optimizer, scheduler = _toy(0)
    loader = {"position": 0}
    first = _train(model, optimizer, scheduler, 3, loader)
    checkpointer = Checkpointer(tmp_path, rank=0, world_size=1)
    checkpointer.save(3, model=model, optimizer=optimizer, scheduler=scheduler, loader_state=loader, extra={})
    checkpointer.close()

    _seed_all(5)
    model, optimizer, scheduler = _toy(9)
    checkpointer = Checkpointer(tmp_path, rank=0, world_size=1)
    loader_state, _ = checkpointer.load(3, model=model, optimizer=optimizer, scheduler=scheduler)
    assert first + _train(model, optimizer, scheduler, 5, loader_state) == reference
    _seed_all(5)
    model, optimizer, scheduler = _toy(9)
    restored = checkpointer.restore(model=model, optimizer=optimizer, scheduler=scheduler)  # as the trainer resumes
    assert restored.step == 3 and restored.loader_state == {"position": 12}
    assert first + _train(model, optimizer, scheduler, 5, restored.loader_state) == reference
    assert calls == []
    for path in (tmp_path / "checkpoints/step-000003").glob("*.json"):
        assert json.loads(path.read_text())["format"] == "whetstone-checkpoint"  # plain JSON


def test_plain_state_round_trips_exactly(tmp_path):
    model, optimizer, scheduler = _toy(0)
    _train(model, optimizer, scheduler, 2, {"position": 0})
    loader = {
        "files": ["a.tar", "ü/b.tar"],
        "counts": [[1, 2], []],
        "rate": 0.1,
        "big": 2**62,
        "none": None,
        "flag": True,
    }
    extra = {"nested": {"x": -0.0, "inf": float("inf")}, "pair": (1, 2)}
    checkpointer = Checkpointer(tmp_path, rank=0, world_size=1)
    checkpointer.save(2, model=model, optimizer=optimizer, scheduler=scheduler, loader_state=loader, extra=extra)
    checkpointer.wait()
    expected_state = copy.deepcopy(optimizer.state_dict())
    model, optimizer, scheduler = _toy(3)
    restored = checkpointer.restore(model=model, optimizer=optimizer, scheduler=scheduler)
    assert restored.loader_state == loader
    assert restored.extra == {"nested": {"x": -0.0, "inf": float("inf")}, "pair": [1, 2]}  # JSON: tuples become lists
    state = optimizer.state_dict()
    assert state["param_groups"] == expected_state["param_groups"]  # lr, betas (a tuple again), eps, ...
    for index, saved in expected_state["state"].items():
        for name, value in saved.items():
            assert torch.equal(state["state"][index][name], value), (index, name)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_json(path: Path) -> None:
    data = json.loads(path.read_text())
    data["body"]["loader"]["position"] += 1  # a hand-edited resume point; the checksum is left as it was
    path.write_text(json.dumps(data))


def _link_to_older(path: Path) -> None:
    older = path.parents[1] / "step-000002" / path.name
    path.unlink()
    path.symlink_to(older)


DAMAGE = {
    "tensors truncated": ("rank-00000.safetensors", _truncate),
    "tensor byte flipped": ("rank-00000.safetensors", _flip_last_byte),
    "rank json truncated": ("rank-00000.json", _truncate),
    "rank json edited": ("rank-00000.json", _edit_json),
    "manifest truncated": ("checkpoint.json", _truncate),
    "tensors a link": ("rank-00000.safetensors", _link_to_older),
    "rank json removed": ("rank-00000.json", Path.unlink),
}


def _save_steps(run_dir: Path, steps: list[int]) -> tuple[list[float], dict]:
    """Train the toy, saving at each of ``steps``; returns the losses after the first save and its loader state."""
    _seed_all(1)
    model, optimizer, scheduler = _toy(0)
    checkpointer = Checkpointer(run_dir, rank=0, world_size=1)
    loader, done, after_first = {"position": 0}, 0, []
    for step in steps:
        losses = _train(model, optimizer, scheduler, step - done, loader)
        after_first += losses if done else []
        done = step
        checkpointer.save(step, model=model, optimizer=optimizer, scheduler=scheduler, loader_state=loader, extra={})
    after_first += _train(model, optimizer, scheduler, 3, loader)
    checkpointer.close()
    return after_first, loader


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_saying_so(tmp_path, caplog, damage):
    after_step_2, _ = _save_steps(tmp_path, [2, 4])
    name, spoil = DAMAGE[damage]
    spoil(tmp_path / "checkpoints/step-000004" / name)

    _seed_all(7)
    model, optimizer, scheduler = _toy(5)
    checkpointer = Checkpointer(tmp_path, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING):
        restored = checkpointer.restore(model=model, optimizer=optimizer, scheduler=scheduler)
    assert restored.step == 2 and restored.loader_state == {"position": 8}
    assert _train(model, optimizer, scheduler, 5, restored.loader_state) == after_step_2  # exactly step 2's state
    assert "checkpoint step 4 cannot be resumed" in caplog.text
    assert "resuming from checkpoint step 2: the newer checkpoint(s) [4] are damaged and set aside" in caplog.text
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000002",
        f"step-000004.damaged-{checkpointer._token}",
    ]
    assert checkpointer.latest_step() == 2  # the next save of step 4 cannot collide with the damaged one


def test_every_checkpoint_damaged_fails_naming_each(tmp_path):
    _save_steps(tmp_path, [2, 4])
    _truncate(tmp_path / "checkpoints/step-000004/rank-00000.safetensors")
    _flip_last_byte(tmp_path / "checkpoints/step-000002/rank-00000.safetensors")
    model, optimizer, scheduler = _toy(5)
    with pytest.raises(CheckpointDamaged) as caught:
        Checkpointer(tmp_path, rank=0, world_size=1).restore(model=model, optimizer=optimizer, scheduler=scheduler)
    message = str(caught.value)
    assert "no checkpoint in" in message and "step 4:" in message and "truncated" in message
    assert "step 2:" in message and "SHA-256" in message and "run.resume=false" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]  # kept


def test_a_checkpoint_of_other_trainable_weights_is_refused_not_skipped(tmp_path):
    _save_steps(tmp_path, [2, 4])
    model, optimizer, scheduler = _toy(5, frozen=False)  # the "base" is trainable now: another run
    with pytest.raises(CheckpointMismatch, match=r"other trainable tensors than this run \(missing model/0.bias"):
        Checkpointer(tmp_path, rank=0, world_size=1).restore(model=model, optimizer=optimizer, scheduler=scheduler)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_the_trainer_resumes_past_a_truncated_newest_checkpoint(tmp_path, caplog):
    """A run killed while the disk filled (issue #13 defect 6): the newest step's largest file is cut short. The
    resume goes on from the step before and gives the uninterrupted curve."""
    assert run_training(_config(tmp_path / "reference", 6)) == 0
    run = tmp_path / "run"
    assert run_training(_config(run, 4)) == 0
    newest = run / "checkpoints/step-000004"
    _truncate(max((p for p in newest.iterdir() if p.is_file()), key=lambda p: p.stat().st_size))
    with caplog.at_level(logging.INFO):
        assert run_training(_config(run, 6)) == 0
    assert "resuming at step 2 of 6" in caplog.text
    assert "checkpoint step 4 cannot be resumed" in caplog.text
    assert _losses(run) == _losses(tmp_path / "reference")


def test_the_trainer_fails_clearly_when_no_checkpoint_is_intact(tmp_path):
    """Starting over would silently throw the run's progress away (and prune the damaged folders): the resume
    fails instead, as a 'failed' status naming the steps and the way out (CheckpointException never reached it)."""
    run = tmp_path / "run"
    assert run_training(_config(run, 4)) == 0
    for folder in (run / "checkpoints").iterdir():
        _truncate(max((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_size))
    with pytest.raises(CheckpointDamaged, match=r"no checkpoint in .* can be resumed \(step 4: .*; step 2: "):
        run_training(_config(run, 6))
    status = read_status(run)
    assert status["state"] == "failed" and "no checkpoint in" in status["message"], status
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


# ---------------------------------------------------------------------------- FSDP2: each rank's own shards


def test_fsdp2_checkpoint_holds_each_ranks_shards_and_resumes_exactly(tmp_path):
    """Full fine-tuning on 2 processes (gloo): each rank's file holds its DTensor shards with their global layout;
    a run stopped at step 4 and resumed gives the uninterrupted 6-step curve bit for bit; 1 process is refused."""
    from test_engine_runs import tiny_config, train_in_process, train_subprocess

    def config(run_dir: Path, steps: int) -> dict:
        return {**tiny_config(run_dir, "full", micro_batch=2, steps=steps, save_every=2), "optim": {"lr": 1e-3}}

    reference = train_subprocess(config(tmp_path / "reference", 6), nproc=2)
    train_subprocess(config(tmp_path / "run", 4), nproc=2)
    folder = tmp_path / "run/checkpoints/step-000004"
    ranks = [json.loads((folder / f"rank-{r:05d}.json").read_text())["body"] for r in (0, 1)]
    sharded = {n: e for n, e in ranks[0]["tensors"].items() if n.startswith("model/") and e["dtensor"]}
    name = next(n for n, e in sharded.items() if e["dtensor"]["global_shape"][0] >= 2)
    layouts = [body["tensors"][name]["dtensor"] for body in ranks]
    assert layouts[0]["global_shape"] == layouts[1]["global_shape"] and layouts[0]["placements"] == ["Shard(dim=0)"]
    assert layouts[0]["offset"][0] == 0 < layouts[1]["offset"][0] == ranks[0]["tensors"][name]["shape"][0]
    with pytest.raises(CheckpointMismatch, match="written by 2 ranks, this run has 1"):
        train_in_process(config(tmp_path / "run", 6))
    resumed = train_subprocess(config(tmp_path / "run", 6), nproc=2)
    assert [e["loss"] for e in resumed] == [e["loss"] for e in reference]
    assert [e["grad_norm"] for e in resumed] == [e["grad_norm"] for e in reference]


# ---------------------------------------------------------------------------- two ranks agree on what to resume


def _one_rank_damaged_worker(rank: int, port: int, run_dir: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _seed_all(rank)
        model, optimizer, scheduler = _toy(0)
        ddp = DistributedDataParallel(model)
        checkpointer = Checkpointer(run_dir, rank=rank, world_size=2)
        for step in (2, 4):
            _train(ddp, optimizer, scheduler, 2, {"position": 0})
            checkpointer.save(
                step, model=ddp, optimizer=optimizer, scheduler=scheduler, loader_state={"at": step}, extra={}
            )
        checkpointer.close()
        dist.barrier()
        if rank == 0:  # only rank 1's part of step 4 is damaged: rank 0 alone would resume it
            _truncate(Path(run_dir) / "checkpoints/step-000004/rank-00001.safetensors")
        dist.barrier()
        model, optimizer, scheduler = _toy(7)
        restored = Checkpointer(run_dir, rank=rank, world_size=2).restore(
            model=DistributedDataParallel(model), optimizer=optimizer, scheduler=scheduler
        )
        results[rank] = (restored.step, restored.loader_state)
    finally:
        dist.destroy_process_group()


def test_ranks_agree_to_fall_back_when_one_ranks_part_is_damaged(tmp_path):
    with mp.get_context("spawn").Manager() as manager:  # a forked manager can abort on torch state it inherits
        results = manager.dict()
        mp.spawn(_one_rank_damaged_worker, args=(_free_port(), str(tmp_path), results), nprocs=2, join=True)
        results = dict(results)
    assert results == {0: (2, {"at": 2}), 1: (2, {"at": 2})}
