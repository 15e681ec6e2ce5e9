"""Streaming shards back as bucket-homogeneous batches: `ShardLoader`, in one of two layouts.

*samples* (any set on any number of ranks; `sample_order.py`): the set is permuted with (seed, epoch) and cut into
global micro-batches of world_size x batch_size; rank r takes the r-th slice of each, DataLoader worker w every
num_workers-th of the rank's batches. Every rank gets the same number of batches, and the order is the same for any
world size with the same global micro-batch -- a function of (seed, epoch, world_size x batch_size) -- so 1-rank and
N-rank runs see the same samples at every step. (The full permutation needs no shuffle buffer, and every rank has
the same batch count, so neither shuffle_buffer nor even_batches applies.)

*shards* (the fast path for large sets, chosen when every reader -- rank x worker -- gets at least
MIN_SHARDS_PER_READER whole shards): per epoch the shard list is permuted with (seed, epoch); rank r takes every
world_size-th shard of that order and worker w every num_workers-th shard of the rank's share, so each shard is read
by one rank only. Each worker shuffles its samples with a buffer seeded by (seed, epoch, rank, worker), groups them
by bucket and yields a batch whenever a bucket holds batch_size samples. `num_batches(rank)` is exact (from the
manifest's per-shard bucket counts); with even_batches=True every rank stops after `steps_per_epoch` (the minimum
over ranks), dropping its remaining batches for that epoch (which ones changes with the epoch's shard order). This
order depends on world_size and num_workers too, so its state resumes only with the same ones.

In both, a bucket's leftover is a short batch (drop_last=False, the default) or dropped (drop_last=True). Every
batch's position is deterministic, so the loader's state is (epoch, batches consumed); a restored loader replays
its streams and skips the consumed batches without decoding them.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from .batches import Batch, decode_images_nvjpeg, nvjpeg_available
from .remote import RetryPolicy, open_shard_set
from .sample_order import global_micro_batches, index_samples, rank_slice
from .shards import load_manifest
from .worker_streams import SampleBatches, SamplePlan, StreamPlan, WorkerStream, in_order, keep_freed_memory

logger = logging.getLogger(__name__)

#: Whole-shard layout only when every reader (rank x worker) gets at least this many shards: then the even-batches
#: cut costs at most about one shard in this many per epoch.
MIN_SHARDS_PER_READER = 8


class ShardLoader:
    """Iterates one epoch per `for batch in loader`, then advances to the next epoch. See the module docstring."""

    def __init__(
        self,
        source: str | Path,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        drop_last: bool = False,
        even_batches: bool = False,
        pin_memory: bool | None = None,
        image_decode: str = "auto",
        prefetch_factor: int = 4,
        cache_dir: str | Path | None = None,
        retry: RetryPolicy | None = None,
        storage_options: dict | None = None,
        buckets: frozenset[str] | None = None,
    ) -> None:
        """``buckets``: yield only these buckets' samples (one resolution of a multi-resolution set); None: all."""
        self.remote = open_shard_set(source, cache_dir=cache_dir, retry=retry, storage_options=storage_options)
        if self.remote is None:
            self.shard_dir, self.manifest = load_manifest(Path(source))
        else:
            self.shard_dir, self.manifest = self.remote.folder, self.remote.manifest
        _check_arguments(batch_size, rank, world_size, num_workers, shuffle_buffer, image_decode)
        self.buckets = None if buckets is None else frozenset(buckets)
        self.shards = sorted(shard["name"] for shard in self.manifest["shards"])
        self._bucket_counts = {
            s["name"]: {b: n for b, n in s["buckets"].items() if self.buckets is None or b in self.buckets}
            for s in self.manifest["shards"]
        }
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.shuffle_buffer, self.seed = num_workers, shuffle_buffer, seed
        self.drop_last, self.even_batches, self.prefetch_factor = drop_last, even_batches, prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.image_decode = self._resolve_image_decode(image_decode)
        self.layout = self._choose_layout()
        if self.remote is not None and self.layout == "samples":
            self.remote.fetch_all(self.shards)  # every rank reads from every shard: fetch them all once
        self._spans = index_samples(self.shard_dir, self.shards) if self.layout == "samples" else []
        if self.buckets is not None:
            self._spans = [span for span in self._spans if span.bucket in self.buckets]
        self.samples = sum(sum(counts.values()) for counts in self._bucket_counts.values())
        if self.layout == "samples" and len(self._spans) != self.samples:
            raise ValueError(
                f"{self.shard_dir} holds {len(self._spans)} samples but its manifest lists {self.samples}; repack it"
            )
        self._groups: tuple[int, list[list[int]]] | None = None  # (epoch, its global micro-batches), cached
        self.epoch = 0
        self._consumed = [0] * (max(num_workers, 1) if self.layout == "shards" else 1)
        self._samples_consumed = 0

    def _choose_layout(self) -> str:
        readers = self.world_size * max(self.num_workers, 1)
        whole = len(self.shards) >= MIN_SHARDS_PER_READER * readers
        logger.info(
            "%s: %d shards for %d readers (%d rank(s) x %d worker(s)); %s",
            "whole shards per rank" if whole else "samples split across ranks",
            len(self.shards),
            readers,
            self.world_size,
            max(self.num_workers, 1),
            f"each reader gets at least {MIN_SHARDS_PER_READER}"
            if whole
            else f"fewer than {MIN_SHARDS_PER_READER} per reader, so every rank reads the shards it needs",
        )
        return "shards" if whole else "samples"

    def _resolve_image_decode(self, requested: str) -> str:
        has_latents = self.manifest["contents"]["latent_encoder"] is not None
        jpeg = self.manifest["contents"]["image_format"] == "jpg"
        if has_latents or self.manifest["contents"]["image_format"] is None:
            return "none"
        if requested == "cuda" and not (jpeg and nvjpeg_available()):
            raise ValueError("image_decode='cuda' needs JPEG shards, torchvision and a CUDA device; use 'cpu'")
        return "defer" if requested in ("auto", "cuda") and jpeg and nvjpeg_available() else "cpu"

    # ---- epoch layout

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning on the next iteration."""
        self.epoch = epoch
        self._consumed = [0] * len(self._consumed)
        self._samples_consumed = 0

    @property
    def batches_consumed(self) -> int:
        """Batches of the current epoch already handed out (0 at an epoch's start)."""
        return sum(self._consumed)

    def shard_order(self, epoch: int | None = None) -> list[str]:
        order = list(self.shards)
        random.Random(f"shards:{self.seed}:{self.epoch if epoch is None else epoch}").shuffle(order)
        return order

    def _worker_shards(self, rank: int) -> list[list[str]]:
        rank_shards = self.shard_order()[rank :: self.world_size]
        workers = max(self.num_workers, 1)
        return [rank_shards[worker::workers] for worker in range(workers)]

    def _global_micro_batches(self) -> list[list[int]]:
        if self._groups is None or self._groups[0] != self.epoch:
            buckets = [span.bucket for span in self._spans]
            size = self.batch_size * self.world_size
            groups = global_micro_batches(
                buckets, seed=self.seed, epoch=self.epoch, size=size, drop_last=self.drop_last
            )
            self._groups = (self.epoch, groups)
        return self._groups[1]

    def num_batches(self, rank: int | None = None) -> int:
        """Exact number of batches `rank` (default: this loader's rank) yields this epoch without even_batches."""
        if self.layout == "samples":
            return len(self._global_micro_batches())
        return sum(self._worker_batch_counts(self.rank if rank is None else rank))

    def _worker_batch_counts(self, rank: int) -> list[int]:
        """Batches each DataLoader worker of `rank` makes this epoch in the whole-shard layout."""
        counts = []
        for shards in self._worker_shards(rank):
            per_bucket: dict[str, int] = {}
            for shard in shards:
                for bucket, count in self._bucket_counts[shard].items():
                    per_bucket[bucket] = per_bucket.get(bucket, 0) + count
            rounding = math.floor if self.drop_last else math.ceil
            counts.append(sum(rounding(count / self.batch_size) for count in per_bucket.values()))
        return counts

    @property
    def steps_per_epoch(self) -> int:
        """The number of batches every rank can do this epoch (the minimum over ranks)."""
        if self.layout == "samples":
            return self.num_batches()
        return min(self.num_batches(rank) for rank in range(self.world_size))

    def __len__(self) -> int:
        return self.steps_per_epoch if self.even_batches else self.num_batches()

    # ---- iteration

    def _dataset(self, decode: str) -> IterableDataset:
        if self.layout == "samples":
            groups = self._global_micro_batches()[self.batches_consumed :]
            batches = (rank_slice(g, rank=self.rank, world_size=self.world_size) for g in groups)
            return SampleBatches(
                SamplePlan(
                    shard_dir=self.shard_dir,
                    batches=tuple(tuple(self._spans[i] for i in batch) for batch in batches),
                    first_index=self.batches_consumed,
                    workers=max(self.num_workers, 1),
                    decode_images=decode,
                )
            )
        plan = StreamPlan(
            shard_dir=self.shard_dir,
            shards_per_worker=tuple(tuple(s) for s in self._worker_shards(self.rank)),
            skip_per_worker=tuple(self._consumed),
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            drop_last=self.drop_last,
            seed_prefix=f"samples:{self.seed}:{self.epoch}:{self.rank}",
            decode_images=decode,
            remote=self.remote,
            buckets=self.buckets,
        )
        return WorkerStream(plan)

    def __iter__(self) -> Iterator[Batch]:
        decode = "cpu" if self.image_decode == "cpu" else "defer" if self.image_decode == "defer" else "none"
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        loader = DataLoader(
            self._dataset(decode),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=keep_freed_memory if self.num_workers > 0 else None,
            **extra,
        )
        limit = self.steps_per_epoch if self.even_batches else None
        batches = iter(loader)
        if self.layout == "shards" and self.num_workers > 1:
            batches = in_order(batches, self._remaining_order())
        for batch in batches:
            if limit is not None and self.batches_consumed >= limit:
                break
            if self.image_decode == "defer":
                batch = decode_images_nvjpeg(batch)
            self._consumed[batch.worker if self.layout == "shards" else 0] += 1
            self._samples_consumed += len(batch)
            yield batch
        self.set_epoch(self.epoch + 1)

    def _remaining_order(self) -> list[tuple[int, int]]:
        """(index, worker) of this epoch's remaining batches in an uninterrupted pass's order.

        A DataLoader takes one batch from each worker in turn (skipping exhausted ones), so an uninterrupted epoch
        is ordered by (index, worker). A restored loader's DataLoader starts its turns at worker 0 whatever was
        consumed, so its batches are put back in this order (at most one per worker is held back).
        """
        counts = self._worker_batch_counts(self.rank)
        return sorted((index, worker) for worker, n in enumerate(counts) for index in range(self._consumed[worker], n))

    # ---- resumable position

    def state_dict(self) -> dict:
        state = {
            "epoch": self.epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "layout": self.layout,
            "shard_order": self.shard_order(),
            "batches_consumed": self.batches_consumed,
            "samples_consumed": self._samples_consumed,
        }
        if self.layout == "shards":
            state["batches_consumed_per_worker"] = list(self._consumed)
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("layout") != self.layout:
            raise ValueError(
                f"loader state was saved in the {state.get('layout')!r} layout but this loader uses {self.layout!r} "
                "(the layout follows the shard count, world size and data.num_workers); resume with the saved run's "
                "settings"
            )
        names = ("seed", "rank", "world_size", "batch_size")
        for name in (*names, "num_workers") if self.layout == "shards" else names:
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"loader state has {name}={state[name]!r} but this loader has {name}={getattr(self, name)!r}; "
                    f"create the loader with {name}={state[name]!r} to resume exactly"
                )
        self.set_epoch(state["epoch"])
        if state["shard_order"] != self.shard_order():
            raise ValueError(f"the shard set in {self.shard_dir} changed since this state was saved; cannot resume")
        if self.layout == "shards":
            self._consumed = list(state["batches_consumed_per_worker"])
        else:
            self._consumed = [int(state["batches_consumed"])]
        self._samples_consumed = state["samples_consumed"]


def _check_arguments(batch_size, rank, world_size, num_workers, shuffle_buffer, image_decode) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must be >= 0 (0 loads in the main process)")
    if shuffle_buffer <= 0:
        raise ValueError(f"shuffle_buffer={shuffle_buffer} must be positive (1 disables shuffling within shards)")
    if image_decode not in ("auto", "cpu", "cuda"):
        raise ValueError(f"image_decode={image_decode!r} must be 'auto', 'cpu' or 'cuda'")
