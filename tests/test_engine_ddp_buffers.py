"""apply_ddp on two gloo ranks: the trainable gradients are averaged, and the frozen buffers (the FP8 base's e4m3
weights live in buffers) are not re-broadcast from rank 0 before every forward, which DDP does by default."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from training.engine.distributed import DistInfo
from training.engine.parallelize import apply_ddp


class FrozenBufferModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("frozen", torch.ones(4, 4), persistent=False)
        self.adapter = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x @ self.frozen)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = FrozenBufferModel()
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        wrapped = apply_ddp(model, info)
        with torch.no_grad():
            model.frozen.fill_(float(rank + 1))  # a broadcast before the forward would make rank 1's 1.0 too
        for _ in range(2):
            wrapped(torch.full((2, 4), float(rank + 1))).sum().backward()
        results[rank] = (model.frozen.flatten().tolist(), model.adapter.weight.grad.flatten().tolist())
    finally:
        dist.destroy_process_group()


def test_ddp_averages_gradients_and_leaves_each_ranks_buffers_alone():
    with mp.get_context("spawn").Manager() as manager:  # a forked manager can abort on torch state it inherits
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert results[0][0] == [1.0] * 16 and results[1][0] == [2.0] * 16
    # each rank's input row sum through its buffer: rank r sends (r+1) * 4 * (r+1); two steps accumulate
    expected = 2 * (1 * 4 * 1 * 2 + 2 * 4 * 2 * 2) / 2  # batch of 2 rows, averaged over the two ranks
    assert results[0][1] == results[1][1] == [expected] * 16
