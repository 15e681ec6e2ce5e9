"""What the planner needs to know about a shard set: its bucket shapes with their sample counts, and the distribution
of encoded caption lengths (tokens of the caption features). ``pack`` writes them into the manifest; the planner, the
Train node and the engine read them back with ``read_dataset_stats`` (validated: a manifest is untrusted input).

A manifest written before these statistics has no ``caption_tokens`` section: ``caption_histogram`` is then None and
callers fall back to typed values, saying so."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .remote import is_url, read_remote_manifest
from .shards import ShardInfo, load_manifest

CAPTION_TOKENS_KEY = "caption_tokens"
SUMMARY_PERCENTILES = (50, 90, 95, 99)
_BUCKET_NAME = re.compile(r"^(\d{1,5})x(\d{1,5})$")
_MAX_TOKENS = 1 << 20


def percentile(histogram: dict[int, int], q: float) -> int:
    """Nearest-rank percentile: the smallest length that at least ``q`` % of the samples do not exceed."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q!r}")
    total = sum(histogram.values())
    if total == 0:
        raise ValueError("percentile of an empty caption-length histogram")
    needed, seen = math.ceil(total * q / 100), 0
    for tokens in sorted(histogram):
        seen += histogram[tokens]
        if seen >= needed:
            return tokens
    return max(histogram)


def caption_token_summary(histogram: dict[int, int]) -> dict:
    """The manifest's ``caption_tokens`` section: samples, max, mean, p50..p99 and the full histogram."""
    samples = sum(histogram.values())
    summary = {"samples": samples, "max": max(histogram)}
    summary["mean"] = round(sum(t * n for t, n in histogram.items()) / samples, 2)
    summary.update({f"p{q}": percentile(histogram, q) for q in SUMMARY_PERCENTILES})
    summary["histogram"] = {str(t): histogram[t] for t in sorted(histogram)}
    return summary


def manifest_statistics(shards: list[ShardInfo]) -> dict:
    """Manifest keys from the shards' own counts: ``caption_tokens`` when every sample's caption length is known
    (encoded with a text encoder, and no shard from a pack state written before the counts existed)."""
    histogram: dict[int, int] = {}
    for shard in shards:
        if sum(shard.caption_tokens.values()) != shard.samples:
            return {}
        for tokens, count in shard.caption_tokens.items():
            histogram[int(tokens)] = histogram.get(int(tokens), 0) + count
    return {CAPTION_TOKENS_KEY: caption_token_summary(histogram)} if histogram else {}


@dataclass(kw_only=True, frozen=True)
class DatasetStats:
    """A shard set's shapes and caption lengths. ``buckets``: (width, height) px -> samples; ``caption_histogram``:
    encoded caption tokens -> samples, None when the manifest has no statistics (packed by an older version or
    without a text encoder)."""

    path: str
    samples: int
    buckets: dict[tuple[int, int], int]
    caption_histogram: dict[int, int] | None = None

    @property
    def caption_tokens_max(self) -> int | None:
        return max(self.caption_histogram) if self.caption_histogram else None

    def caption_tokens_at(self, q: float) -> int | None:
        return percentile(self.caption_histogram, q) if self.caption_histogram else None

    def captions_longer_than(self, tokens: int) -> int:
        return sum(n for t, n in (self.caption_histogram or {}).items() if t > tokens)

    def describe(self) -> str:
        shapes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sorted(self.buckets.items()))
        captions = "caption lengths unknown"
        if self.caption_histogram:
            captions = f"captions up to {self.caption_tokens_max} tokens (p99 {self.caption_tokens_at(99)})"
        return f"{self.samples} samples in buckets {shapes}; {captions}"

    @classmethod
    def from_manifest(cls, manifest: dict, path: str) -> DatasetStats:
        where = f"{path} (manifest.json)"
        buckets = {}
        raw_buckets = manifest.get("buckets")
        if not isinstance(raw_buckets, dict) or not raw_buckets:
            raise ValueError(f"{where}: 'buckets' must be a non-empty object of 'WxH': samples; repack the folder")
        for name, count in raw_buckets.items():
            match = _BUCKET_NAME.match(str(name))
            if not match or not _count(count):
                raise ValueError(f"{where}: bucket {name!r}: {count!r} is not 'WxH': samples; repack the folder")
            buckets[(int(match[1]), int(match[2]))] = count
        samples = manifest.get("samples")
        if not _count(samples) or samples != sum(buckets.values()):
            raise ValueError(f"{where}: 'samples' {samples!r} does not equal the bucket counts; repack the folder")
        return cls(path=path, samples=samples, buckets=buckets, caption_histogram=_histogram(manifest, where, samples))


def read_dataset_stats(source: str | os.PathLike) -> DatasetStats:
    """The statistics of a shard folder (or its manifest.json), or of a set at a URL (only its manifest is read)."""
    if is_url(source):
        return DatasetStats.from_manifest(read_remote_manifest(source), source)
    folder, manifest = load_manifest(Path(source))
    return DatasetStats.from_manifest(manifest, str(folder))


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _histogram(manifest: dict, where: str, samples: int) -> dict[int, int] | None:
    section = manifest.get(CAPTION_TOKENS_KEY)
    if section is None:
        return None
    raw = section.get("histogram") if isinstance(section, dict) else None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: '{CAPTION_TOKENS_KEY}.histogram' must be an object of tokens: samples")
    histogram = {}
    for tokens, count in raw.items():
        if not str(tokens).isdigit() or not 0 < int(tokens) <= _MAX_TOKENS or not _count(count):
            raise ValueError(f"{where}: caption length {tokens!r}: {count!r} is not tokens: samples; repack")
        histogram[int(tokens)] = count
    if sum(histogram.values()) != samples:
        raise ValueError(f"{where}: the caption-length histogram counts {sum(histogram.values())} of {samples} samples")
    return histogram
