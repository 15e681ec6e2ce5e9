"""What the planner needs to know about a shard set: its bucket shapes with their sample counts, and the distribution
of encoded caption lengths (tokens of the caption features). ``pack`` writes them into the manifest; the planner, the
Train node and the engine read them back with ``read_dataset_stats`` (validated: a manifest is untrusted input).

A manifest written before these statistics has no ``caption_tokens`` section: ``caption_histogram`` is then None and
callers fall back to typed values, saying so."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .remote import is_url, read_remote_manifest
from .shards import ShardInfo, load_manifest

CAPTION_TOKENS_KEY = "caption_tokens"
#: The manifest's samples per (pack resolution, bucket): {"512": {"512x512": n, ...}, "1024": {...}}.
RESOLUTIONS_KEY = "resolutions"
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


def resolution_counts(resolutions: tuple[int, ...], shards: list[ShardInfo]) -> dict[str, dict[str, int]]:
    """The manifest's ``resolutions`` section from the shards' counts (one resolution: all of its buckets)."""
    totals: dict[str, dict[str, int]] = {}
    for shard in shards:
        per_resolution = shard.resolutions or {str(resolutions[0]): shard.buckets}
        for resolution, buckets in per_resolution.items():
            section = totals.setdefault(resolution, {})
            for name, count in buckets.items():
                section[name] = section.get(name, 0) + count
    return {r: dict(sorted(totals[r].items())) for r in sorted(totals, key=int)}


def resolution_buckets(manifest: dict, where: str) -> dict[int, dict[str, int]]:
    """Pack resolution -> bucket name -> samples, validated. A manifest written before multi-resolution packs has
    no such section: its one resolution is ``settings.resolution`` and its buckets are all of them ({} when even
    that is missing: the pack resolution is then unknown, which only a resolution schedule needs)."""
    section = manifest.get(RESOLUTIONS_KEY)
    if section is None:
        settings = manifest.get("settings")
        resolution = settings.get("resolution") if isinstance(settings, dict) else None
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
            return {}
        return {resolution: dict(manifest.get("buckets") or {})}
    if not isinstance(section, dict) or not section:
        raise ValueError(f"{where}: '{RESOLUTIONS_KEY}' must be an object of resolution: {{bucket: samples}}; repack")
    result: dict[int, dict[str, int]] = {}
    for resolution, buckets in section.items():
        if not str(resolution).isdigit() or not isinstance(buckets, dict):
            raise ValueError(f"{where}: resolution {resolution!r} is not px: {{bucket: samples}}; repack the folder")
        for name, count in buckets.items():
            if not _BUCKET_NAME.match(str(name)) or not _count(count):
                raise ValueError(f"{where}: {resolution} px bucket {name!r}: {count!r} is not 'WxH': samples; repack")
        result[int(resolution)] = dict(buckets)
    names = [name for buckets in result.values() for name in buckets]
    if len(names) != len(set(names)):
        raise ValueError(f"{where}: a bucket is listed under two resolutions in '{RESOLUTIONS_KEY}'; repack the folder")
    return result


@dataclass(kw_only=True, frozen=True)
class DatasetStats:
    """A shard set's shapes and caption lengths. ``buckets``: (width, height) px -> samples; ``caption_histogram``:
    encoded caption tokens -> samples, None when the manifest has no statistics (packed by an older version or
    without a text encoder)."""

    path: str
    samples: int
    buckets: dict[tuple[int, int], int]
    caption_histogram: dict[int, int] | None = None
    #: Pack resolution -> its buckets' (width, height) -> samples ({} when built by hand without them).
    resolutions: dict[int, dict[tuple[int, int], int]] = dataclasses.field(default_factory=dict)

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
        per_resolution = {
            resolution: {_shape(name): count for name, count in names.items()}
            for resolution, names in resolution_buckets(manifest, where).items()
        }
        if per_resolution and sum(sum(b.values()) for b in per_resolution.values()) != samples:
            raise ValueError(f"{where}: '{RESOLUTIONS_KEY}' does not count the {samples} samples; repack the folder")
        return cls(
            path=path,
            samples=samples,
            buckets=buckets,
            caption_histogram=_histogram(manifest, where, samples),
            resolutions=per_resolution,
        )


def read_dataset_stats(source: str | os.PathLike) -> DatasetStats:
    """The statistics of a shard folder (or its manifest.json), or of a set at a URL (only its manifest is read)."""
    if is_url(source):
        return DatasetStats.from_manifest(read_remote_manifest(source), source)
    folder, manifest = load_manifest(Path(source))
    return DatasetStats.from_manifest(manifest, str(folder))


def _shape(name: str) -> tuple[int, int]:
    width, height = name.split("x")
    return int(width), int(height)


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
