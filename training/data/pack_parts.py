"""The parts of a distributed pack: one per block of `samples_per_shard` sorted inputs, written by whichever rank
encodes it, then cut into the shards a single-process pack writes.

A part is ``.parts/part-<block>.tar`` (the block's accepted samples, written by `ShardWriter`, so fsynced and renamed
into place only when complete) and ``part-<block>.json`` beside it, written after the tar: the fingerprint of the
pack, the tar's size and sha256, and per input what became of it (a sample with its key, bucket, caption length and
member count; a skip; notes). Blocks depend on the input list and samples_per_shard only, never on the rank count,
so a pack interrupted on N ranks resumes on any number. A part's json is read back as untrusted data: JSON only,
every field checked, a part that does not verify is encoded again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..atomic import write_json_atomic
from .inputs import InputFile, Skip
from .shards import ShardInfo, ShardSample, ShardWriter, iter_tar_members, read_json, shard_is_intact

logger = logging.getLogger(__name__)

PARTS_DIR = ".parts"
PART_VERSION = 1


def part_stem(block: int) -> str:
    return f"part-{block:06d}"


def block_range(block: int, block_size: int, total: int) -> range:
    return range(block * block_size, min((block + 1) * block_size, total))


def encode_block(
    *,
    parts: Path,
    block: int,
    inputs: list[InputFile],
    span: range,
    builder,
    pool: ThreadPoolExecutor,
    window: int,
    encode_batch: int,
    fingerprint: str,
    should_stop: Callable[[], bool] | None,
    on_input: Callable[[], None],
) -> dict:
    """Encode inputs[span] into part `block` (as the single-process pack encodes them); returns the part's record."""
    from .pack import PackInterrupted, _prepared_stream  # the single-process pack's decoding, shared

    writer = ShardWriter(path=parts / f"{part_stem(block)}.tar")
    record = {"samples": [], "skipped": [], "notes": []}
    pending: list[tuple[int, object]] = []

    def flush() -> None:
        for (index, _), sample in zip(pending, builder.build_batch([prepared for _, prepared in pending])):
            writer.add(sample)
            record["samples"].append(_sample_record(index, sample))
        pending.clear()

    try:
        chunk = inputs[span.start : span.stop]
        for offset, outcome in _prepared_stream(pool, window, builder, chunk, 0):
            if should_stop is not None and should_stop():
                raise PackInterrupted(f"stopped while encoding block {block}; run the pack again to resume")
            index = span.start + offset
            relative = inputs[index].relative
            if isinstance(outcome, Skip):
                record["skipped"].append(_note(index, relative, outcome.reason, outcome.kind))
            else:
                # one Prepared per resolution kept; the distributed pack runs single-resolution packs only
                record["notes"].extend(_note(index, relative, note, kind) for kind, note in outcome[0].notes)
                pending.extend((index, prepared) for prepared in outcome)
                if len(pending) >= encode_batch:
                    flush()
            on_input()
        flush()
        info = writer.finish(end_input=span.stop)
    except BaseException:
        writer.abort()
        raise
    record |= {
        "part_version": PART_VERSION,
        "fingerprint": fingerprint,
        "block": block,
        "start": span.start,
        "stop": span.stop,
        "tar": {"bytes": info.bytes, "sha256": info.sha256},
    }
    write_json_atomic(parts / f"{part_stem(block)}.json", record, ensure_ascii=False)
    return record


def _sample_record(index: int, sample: ShardSample) -> dict:
    return {
        "index": index,
        "key": sample.key,
        "bucket": sample.bucket,
        "caption_tokens": sample.caption_tokens,
        "members": len(sample.members),
    }


def _note(index: int, path: str, message: str, kind: str) -> dict:
    return {"index": index, "path": path, "message": message, "kind": kind}


def completed_part(parts: Path, block: int, span: range, fingerprint: str) -> dict | None:
    """The record of part `block` if it is complete, of this pack, and its tar verifies; else None (logged)."""
    if not (parts / f"{part_stem(block)}.json").is_file():
        return None
    try:
        record = read_part(parts, block, span, fingerprint)
    except ValueError as error:
        logger.warning("part %d is not usable (%s); it will be encoded again", block, error)
        return None
    tar = ShardInfo(name=f"{part_stem(block)}.tar", samples=0, bytes=record["tar"]["bytes"],
                    sha256=record["tar"]["sha256"], buckets={})  # fmt: skip
    if not shard_is_intact(parts, tar):
        logger.warning("part %d's tar is missing or damaged; it will be encoded again", block)
        return None
    return record


def read_part(parts: Path, block: int, span: range, fingerprint: str) -> dict:
    """Part `block`'s record, checked (its tar is not re-hashed: `completed_part` verified it, or this run wrote it)."""
    record = read_json(parts / f"{part_stem(block)}.json")
    _check_record(record, block, span, fingerprint)
    return record


def _check_record(record, block: int, span: range, fingerprint: str) -> None:
    if not isinstance(record, dict) or record.get("part_version") != PART_VERSION:
        raise ValueError("not a part record of this version")
    if record.get("fingerprint") != fingerprint:
        raise ValueError("made from other inputs or settings")
    if (record.get("block"), record.get("start"), record.get("stop")) != (block, span.start, span.stop):
        raise ValueError(f"covers other inputs than {span.start}..{span.stop}")
    tar = record.get("tar")
    if not isinstance(tar, dict) or not _is_count(tar.get("bytes")) or not isinstance(tar.get("sha256"), str):
        raise ValueError("no size and sha256 of its tar")
    previous = span.start - 1
    for sample in _list(record, "samples"):
        keys = ("index", "key", "bucket", "caption_tokens", "members")
        if not isinstance(sample, dict) or set(sample) != set(keys):
            raise ValueError(f"a sample record {sample!r} lacks fields")
        if not (_is_count(sample["index"]) and previous < sample["index"] < span.stop):
            raise ValueError(f"sample index {sample['index']!r} is out of order or outside the block")
        previous = sample["index"]
        if not (isinstance(sample["key"], str) and isinstance(sample["bucket"], str) and _is_count(sample["members"])):
            raise ValueError(f"sample record {sample!r} has a field of the wrong type")
        if sample["caption_tokens"] is not None and not _is_count(sample["caption_tokens"]):
            raise ValueError(f"sample record {sample!r} has caption_tokens that are not a count")
    for entry in _list(record, "skipped") + _list(record, "notes"):
        fields = ("index", "path", "message", "kind")
        if not isinstance(entry, dict) or set(entry) != set(fields) or not _is_count(entry["index"]):
            raise ValueError(f"a skip or note record {entry!r} is malformed")
        if not all(isinstance(entry[name], str) for name in fields[1:]):
            raise ValueError(f"a skip or note record {entry!r} has a field that is not text")


def _list(record: dict, key: str) -> list:
    value = record.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{key!r} is not a list")
    return value


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def part_samples(parts: Path, block: int, record: dict) -> Iterator[tuple[dict, ShardSample]]:
    """(sample record, sample) of part `block` in order, rebuilt from its tar exactly as they were written."""
    members = iter_tar_members(parts / f"{part_stem(block)}.tar")
    for sample in record["samples"]:
        key, taken = sample["key"], []
        for _ in range(sample["members"]):
            member = next(members, None)
            if member is None or not member["fname"].startswith(key + "."):
                raise ValueError(f"{parts / part_stem(block)}.tar does not hold sample {key!r}; repack")
            taken.append((member["fname"][len(key) + 1 :], member["data"]))
        yield (
            sample,
            ShardSample(
                key=key, members=tuple(taken), bucket=sample["bucket"], caption_tokens=sample["caption_tokens"]
            ),
        )


def write_shard(
    *, output_dir: Path, name: str, number: int, pieces: list[tuple[int, dict, int, int]], parts: Path, last: bool,
    total_inputs: int,
) -> ShardInfo:  # fmt: skip
    """Shard `number` from (block, record, first, stop) slices of parts' samples; end_input as the single-process
    pack sets it: past the shard's last sample, or past every input for a final shard that is not full."""
    writer = ShardWriter(path=output_dir / f"{name}-{number:06d}.tar")
    end_input = 0
    try:
        for block, record, first, stop in pieces:
            for position, (sample, built) in enumerate(part_samples(parts, block, record)):
                if first <= position < stop:
                    writer.add(built)
                    end_input = sample["index"] + 1
        return writer.finish(end_input=total_inputs if last else end_input)
    except BaseException:
        writer.abort()
        raise
