"""The sample layout of `ShardLoader`: every rank reads the shards it needs and takes its own samples.

Per epoch the whole set is permuted with (seed, epoch) and cut into bucket-homogeneous *global micro-batches* of
world_size x batch_size samples (a bucket's leftover is a short one, or dropped with drop_last). Rank r takes the
r-th contiguous slice of each, so one process with micro-batch W·b sees exactly the samples W processes with
micro-batch b see together, in the same positions, and every rank gets one batch per global micro-batch.

A short global micro-batch of k samples is padded to a multiple of world_size by repeating its own samples from its
start, then cut into world_size equal slices: every rank still gets a batch, and DDP's mean of the ranks' means
stays the mean over the samples. So with world_size > 1 each sample is seen at least once per epoch and the padding
copies (fewer than world_size per bucket) are the only repeats; with world_size 1 each is seen exactly once.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .shards import iter_tar_members


@dataclass(frozen=True, slots=True)
class SampleSpan:
    """Where one sample's tar members lie: shard file name and [start, stop) byte range of their headers."""

    shard: str
    start: int
    stop: int
    bucket: str


def index_samples(shard_dir: Path, shards: list[str]) -> list[SampleSpan]:
    """Every sample of the shards, in shard then tar order, from a header-only scan (only the .json is read)."""
    from webdataset.tariterators import base_plus_ext

    spans: list[SampleSpan] = []
    for shard in shards:
        key = bucket = None
        start = end = 0
        for member in iter_tar_members(shard_dir / shard, read_data=lambda fname: fname.endswith(".json")):
            member_key, _ = base_plus_ext(member["fname"])
            if member_key != key:
                if key is not None:
                    spans.append(_span(shard, key, start, end, bucket, shard_dir))
                key, bucket, start = member_key, None, member["offset"]
            if member["data"] is not None:
                bucket = _bucket(member["data"], shard_dir / shard, key)
            end = member["end"]
        if key is not None:
            spans.append(_span(shard, key, start, end, bucket, shard_dir))
    return spans


def _bucket(data: bytes, path: Path, key: str) -> str:
    try:
        bucket = json.loads(data)["bucket"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: sample {key!r} has no readable bucket in its .json ({error}); repack it") from error
    if not isinstance(bucket, str):
        raise ValueError(f"{path}: sample {key!r} has bucket {bucket!r}, not a name; repack it")
    return bucket


def _span(shard: str, key: str, start: int, stop: int, bucket: str | None, shard_dir: Path) -> SampleSpan:
    if bucket is None:
        raise ValueError(f"{shard_dir / shard}: sample {key!r} has no .json member; repack it")
    return SampleSpan(shard=shard, start=start, stop=stop, bucket=bucket)


def global_micro_batches(buckets: list[str], *, seed: int, epoch: int, size: int, drop_last: bool) -> list[list[int]]:
    """The epoch's bucket-homogeneous groups of sample numbers: full groups of `size` in permutation order, then
    each bucket's leftover (sorted by bucket name) unless drop_last. A function of (seed, epoch, size) alone."""
    order = list(range(len(buckets)))
    random.Random(f"samples:{seed}:{epoch}").shuffle(order)
    groups: list[list[int]] = []
    pending: dict[str, list[int]] = {}
    for sample in order:
        group = pending.setdefault(buckets[sample], [])
        group.append(sample)
        if len(group) == size:
            groups.append(group)
            pending[buckets[sample]] = []
    if not drop_last:
        groups.extend(pending[bucket] for bucket in sorted(pending) if pending[bucket])
    return groups


def rank_slice(group: list[int], *, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s equal contiguous share of a global micro-batch, padded first to a multiple of world_size."""
    padded = group + [group[i % len(group)] for i in range(-len(group) % world_size)]
    share = len(padded) // world_size
    return padded[rank * share : (rank + 1) * share]


def read_spans(shard_dir: Path, spans: list[SampleSpan]) -> Iterator[dict]:
    """The samples at `spans` as WebDataset dicts (`__key__` plus one bytes entry per extension)."""
    from webdataset.tariterators import group_by_keys

    for span in spans:
        members = iter_tar_members(shard_dir / span.shard, start=span.start, stop=span.stop)
        samples = list(group_by_keys(members))
        if len(samples) != 1:
            raise ValueError(f"{shard_dir / span.shard} changed since the loader indexed it; restart the run")
        yield samples[0]
