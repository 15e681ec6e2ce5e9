"""What each DataLoader worker of a ``loader.ShardLoader`` runs: the batch stream of its whole shards (buffer-shuffled,
grouped by bucket) or its share of the sample layout's global micro-batches, rebuilt from a plain-data plan; and the
main process's reordering of the workers' batches into an uninterrupted pass's order."""

from __future__ import annotations

import ctypes
import json
import logging
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from .batches import Batch, collate
from .remote import RemoteShardSet
from .sample_order import SampleSpan, read_spans
from .shards import iter_tar_members

logger = logging.getLogger("training.data.loader")  # the loader's workers log as the loader


@dataclass(kw_only=True, frozen=True)
class StreamPlan:
    """Everything a worker process needs to regenerate its batch stream (plain data, cheap to send to workers)."""

    shard_dir: Path
    shards_per_worker: tuple[tuple[str, ...], ...]
    skip_per_worker: tuple[int, ...]
    batch_size: int
    shuffle_buffer: int
    drop_last: bool
    seed_prefix: str
    decode_images: str  # "cpu", or "defer" to hand raw bytes to the main process (nvJPEG)
    remote: RemoteShardSet | None = None  # shards fetched into shard_dir (the set's local view) as they are read
    buckets: frozenset[str] | None = None  # read only these buckets' samples (one resolution of a multi-res set)


class WorkerStream(IterableDataset):
    """The whole-shard layout: worker w's shards, buffer-shuffled, as bucket-homogeneous batches."""

    def __init__(self, plan: StreamPlan) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        plan = self.plan
        rng = random.Random(f"{plan.seed_prefix}:{worker}")
        samples = _shard_samples(plan, plan.shards_per_worker[worker])
        if plan.buckets is not None:
            samples = (s for s in samples if json.loads(s["json"])["bucket"] in plan.buckets)
        samples = _buffer_shuffle(samples, plan.shuffle_buffer, rng)
        for index, group in enumerate(_bucket_groups(samples, plan.batch_size, plan.drop_last)):
            if index >= plan.skip_per_worker[worker]:
                yield collate(
                    group, worker=worker, index=index, decode_images=plan.decode_images, shared=info is not None
                )


@dataclass(kw_only=True, frozen=True)
class SamplePlan:
    """A rank's remaining batches of an epoch in the sample layout: worker w makes every num_workers-th of them."""

    shard_dir: Path
    batches: tuple[tuple[SampleSpan, ...], ...]
    first_index: int  # the epoch-position of batches[0]
    workers: int
    decode_images: str


class SampleBatches(IterableDataset):
    """The sample layout: worker w reads every workers-th of the rank's remaining batches, span by span."""

    def __init__(self, plan: SamplePlan) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        plan = self.plan
        for position in range(worker, len(plan.batches), plan.workers):
            samples = list(read_spans(plan.shard_dir, list(plan.batches[position])))
            index = plan.first_index + position
            yield collate(
                samples, worker=worker, index=index, decode_images=plan.decode_images, shared=info is not None
            )


def _shard_samples(plan: StreamPlan, names: tuple[str, ...]) -> Iterator[dict]:
    """The samples of whole shards in order; a remote set's shards are fetched (verified) first, released after."""
    from webdataset.tariterators import group_by_keys

    for name in names:
        if plan.remote is None:
            yield from group_by_keys(iter_tar_members(plan.shard_dir / name))
            continue
        yield from group_by_keys(iter_tar_members(plan.remote.local_path(name)))
        plan.remote.release(name)


def _buffer_shuffle(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


def _bucket_groups(samples: Iterator[dict], batch_size: int, drop_last: bool) -> Iterator[list[dict]]:
    pending: dict[str, list[dict]] = {}
    for sample in samples:
        bucket = json.loads(sample["json"])["bucket"]
        group = pending.setdefault(bucket, [])
        group.append(sample)
        if len(group) == batch_size:
            yield group
            pending[bucket] = []
    if not drop_last:
        for bucket in sorted(pending):
            if pending[bucket]:
                yield pending[bucket]


def in_order(batches: Iterator[Batch], order: list[tuple[int, int]]) -> Iterator[Batch]:
    """`batches` in `order` of (index, worker), holding back those that arrive early."""
    held: dict[tuple[int, int], Batch] = {}
    expected = iter(order)
    wanted = next(expected, None)
    for batch in batches:
        held[(batch.index, batch.worker)] = batch
        while wanted in held:
            yield held.pop(wanted)
            wanted = next(expected, None)
    if held or wanted is not None:
        raise RuntimeError(f"the shard workers made batches {sorted(held)} but batch {wanted} was expected next")


def keep_freed_memory(worker_id: int) -> None:
    """In our own worker processes, stop glibc returning large freed blocks to the OS after every batch.

    By default each sample-sized allocation is a fresh mmap, and the page faults of touching it again cost more than
    the copying itself (measured 100x on a 2-core VM). Not applied to the main process, which is not ours to tune.
    """
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        logger.debug("glibc not found; worker %d keeps the default malloc settings", worker_id)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)
