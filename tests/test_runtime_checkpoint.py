"""Checkpointer: round trip (sync and async), exact resume, frozen weights never saved, keep-last-K, 2-rank gloo."""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from training.engine.checkpoint import Checkpointer


def _toy(seed: int, frozen: bool = True):
    """The same frozen "base" every time (as if loaded from a file); the trainable head from ``seed``."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    torch.manual_seed(seed)
    model[2].reset_parameters()
    if frozen:
        model[0].requires_grad_(False)  # never in a checkpoint
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int, loader: dict) -> list[float]:
    """Each step draws from torch, numpy and python RNGs, so a resume is exact only if all three are restored."""
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 8) + float(np.random.rand()) + random.random()
        loss = (model(x) - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        loader["position"] += 4
        losses.append(loss.item())
    return losses


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.mark.parametrize("async_save", [True, False])
def test_resume_continues_exactly(tmp_path, async_save):
    _seed_all(1)
    model, optimizer, scheduler = _toy(0)
    reference = _train(model, optimizer, scheduler, 10, {"position": 0})

    _seed_all(1)
    model, optimizer, scheduler = _toy(0)
    loader = {"position": 0}
    first = _train(model, optimizer, scheduler, 6, loader)
    checkpointer = Checkpointer(tmp_path, rank=0, world_size=1)
    checkpointer.save(
        6, model=model, optimizer=optimizer, scheduler=scheduler, loader_state=loader, extra={"tokens": 7},
        async_save=async_save,
    )  # fmt: skip
    _train(model, optimizer, scheduler, 3, loader)  # trained on after the save; must not leak into the checkpoint
    checkpointer.wait()
    assert checkpointer.latest_step() == 6

    _seed_all(99)  # a different process state that load must override
    model, optimizer, scheduler = _toy(5)
    loader_state, extra = Checkpointer(tmp_path, rank=0, world_size=1).load(
        6, model=model, optimizer=optimizer, scheduler=scheduler
    )
    assert loader_state == {"position": 24} and extra == {"tokens": 7}
    assert scheduler.last_epoch == 6
    rest = _train(model, optimizer, scheduler, 4, loader_state)
    assert first + rest == reference  # bit-exact


def test_frozen_weights_not_saved(tmp_path):
    model, optimizer, scheduler = _toy(0)
    _train(model, optimizer, scheduler, 1, {"position": 0})
    checkpointer = Checkpointer(tmp_path, rank=0, world_size=1)
    checkpointer.save(1, model=model, optimizer=optimizer, scheduler=scheduler, loader_state={}, extra={})
    checkpointer.wait()
    metadata = torch.distributed.checkpoint.FileSystemReader(str(tmp_path / "checkpoints/step-000001")).read_metadata()
    model_keys = {k for k in metadata.state_dict_metadata if k.startswith("model.")}
    assert model_keys == {"model.2.weight", "model.2.bias"}


def test_keeps_last_k_and_ignores_partial(tmp_path):
    model, optimizer, scheduler = _toy(0, frozen=False)
    checkpointer = Checkpointer(tmp_path, rank=0, world_size=1, keep=2)
    for step in (1, 2, 3):
        _train(model, optimizer, scheduler, 1, {"position": 0})
        checkpointer.save(step, model=model, optimizer=optimizer, scheduler=scheduler, loader_state={}, extra={})
    checkpointer.save(3, model=model, optimizer=optimizer, scheduler=scheduler, loader_state={}, extra={"again": 1})
    checkpointer.wait()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert checkpointer.load(3, model=model, optimizer=optimizer, scheduler=scheduler)[1] == {"again": 1}
    (tmp_path / "checkpoints/.step-000004.deadbeef").mkdir()  # an attempt killed mid-save
    (tmp_path / "checkpoints/step-000009").mkdir()  # no metadata: not complete
    assert checkpointer.latest_step() == 3
    Checkpointer(tmp_path, rank=0, world_size=1)
    assert not (tmp_path / "checkpoints/.step-000004.deadbeef").exists()


def test_rejects_unloadable_loader_state(tmp_path):
    model, optimizer, scheduler = _toy(0)
    checkpointer = Checkpointer(tmp_path, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"loader_state\['files'\] holds a set"):
        checkpointer.save(1, model=model, optimizer=optimizer, scheduler=None, loader_state={"files": {1}}, extra={})


def test_rejects_other_world_size(tmp_path):
    model, optimizer, scheduler = _toy(0)
    Checkpointer(tmp_path, rank=0, world_size=1).save(
        1, model=model, optimizer=optimizer, scheduler=scheduler, loader_state={}, extra={}, async_save=False
    )
    os.rename(tmp_path / "checkpoints/step-000001/rank-00000.pt", tmp_path / "checkpoints/step-000001/x.pt")
    with pytest.raises(ValueError, match="no state for rank 0"):
        Checkpointer(tmp_path, rank=0, world_size=1).load(1, model=model, optimizer=optimizer, scheduler=scheduler)


# ---------------------------------------------------------------------------- two ranks, gloo, DDP


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, port: int, run_dir: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _seed_all(rank)
        model, optimizer, scheduler = _toy(0)
        ddp = DistributedDataParallel(model)
        checkpointer = Checkpointer(run_dir, rank=rank, world_size=2)
        _train(ddp, optimizer, scheduler, 3, {"position": 0})
        checkpointer.save(3, model=ddp, optimizer=optimizer, scheduler=scheduler, loader_state={"r": rank}, extra={})
        reference = _train(ddp, optimizer, scheduler, 3, {"position": 0})
        checkpointer.wait()
        dist.barrier()

        model, optimizer, scheduler = _toy(7)
        ddp = DistributedDataParallel(model)
        loader_state, _ = Checkpointer(run_dir, rank=rank, world_size=2).load(
            3, model=ddp, optimizer=optimizer, scheduler=scheduler
        )
        results[rank] = (loader_state, reference == _train(ddp, optimizer, scheduler, 3, {"position": 0}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_async_resume(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path), results), nprocs=2, join=True)
        results = dict(results)
    assert results == {0: ({"r": 0}, True), 1: ({"r": 1}, True)}
    folder = tmp_path / "checkpoints/step-000003"
    assert (folder / "rank-00000.pt").is_file() and (folder / "rank-00001.pt").is_file()


# ---------------------------------------------------------------------------- through the engine: QLoRA


def _qlora_run(run_dir, steps: int) -> list[float]:
    from training.engine.config import DataSection, ModelSection, RunSection, TrainConfig
    from training.engine.events import read_events
    from training.engine.trainer import run_training

    config = TrainConfig(
        mode="qlora",
        run=RunSection(output_dir=str(run_dir), steps=steps, save_every=2, micro_batch=2),
        model=ModelSection(preset="tiny", dtype="fp32"),
        data=DataSection(synthetic=True, resolution=64, caption_tokens=16),
    )
    assert run_training(config) == 0
    return [event["loss"] for event in read_events(run_dir)]


def test_qlora_checkpoint_holds_adapter_only_and_resumes_exactly(tmp_path):
    pytest.importorskip("bitsandbytes")
    _qlora_run(tmp_path / "run", 4)
    metadata = torch.distributed.checkpoint.FileSystemReader(str(tmp_path / "run/checkpoints/step-000004"))
    model_keys = [k for k in metadata.read_metadata().state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # no NF4 base, no quant state
    resumed = _qlora_run(tmp_path / "run", 6)
    assert resumed == _qlora_run(tmp_path / "reference", 6)
