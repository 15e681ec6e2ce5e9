"""Packing an image folder into WebDataset shards: `pack_dataset(PackConfig(...))`.

Output folder layout: `<name>-000000.tar ...`, `manifest.json` (counts, buckets, shards with sizes and sha256, encoder
identities, settings, pack version), `report.json` (every skipped input with its reason and kind, and notes) and
`inputs.json` (what the pack was made from, so that a refused rerun says what changed).

Inputs: every entry under input_dir is packed, skipped or noted (see outcomes.py); symbolic links that leave input_dir
are reported and not read unless follow_external_links.

Interruption: `should_stop()` returning True (or the process dying) discards only the shard being written. pack_dataset
then raises PackInterrupted; calling it again with the same settings verifies the completed shards by sha256, keeps
them, and continues, producing the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import TEMP_SUFFIX, write_bytes_atomic, write_json_atomic
from ..lock import FolderLock
from .changes import describe_changes, pack_fingerprint, pack_identity, write_listing
from .encoders import LatentEncoder, TextEncoder
from .images import IMAGE_EXTENSIONS
from .inputs import InputFile, Skip, scan_images
from .outcomes import summary_lines
from .pack_config import PackConfig
from .samples import SampleBuilder
from .shards import (
    EMPTY_CAPTION_NAME,
    MANIFEST_NAME,
    PACK_VERSION,
    REPORT_NAME,
    STATE_NAME,
    ShardInfo,
    ShardWriter,
    read_json,
    shard_is_intact,
)
from .stats import RESOLUTIONS_KEY, manifest_statistics, resolution_counts

logger = logging.getLogger(__name__)


class PackError(Exception):
    """A fatal packing condition (unwritable output, no usable image, a foreign pack in the output folder)."""


class PackInterrupted(Exception):
    """should_stop() asked to stop; completed shards are kept and a rerun with the same settings resumes."""


@dataclass(kw_only=True)
class PackResult:
    output_dir: Path
    manifest_path: Path
    report_path: Path
    samples: int
    skipped: int
    shards: list[ShardInfo]
    buckets: dict[str, int]
    #: Shards found complete and kept from an earlier, interrupted run.
    reused_shards: int = 0
    #: Pack resolution (string key) -> bucket -> samples (one entry for a single-resolution pack).
    resolutions: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Record:
    """A skip or a note about one input; `index` is its position in the sorted inputs (-1: found while scanning)."""

    index: int
    path: str
    message: str
    kind: str = ""  # a key of outcomes.SKIP_KINDS / NOTE_KINDS


@dataclass(kw_only=True)
class _Progress:
    """What a (possibly resumed) pack has done so far; saved to .pack-state.json after every completed shard."""

    fingerprint: str
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[_Record] = field(default_factory=list)
    notes: list[_Record] = field(default_factory=list)
    #: Multi-resolution packs: (input index, path, the resolutions it was stored at), for the report.
    kept: list[tuple[int, str, list[int]]] = field(default_factory=list)

    @property
    def next_input(self) -> int:
        return self.shards[-1].end_input if self.shards else 0

    def to_json(self) -> dict:
        return {
            "pack_version": PACK_VERSION,
            "fingerprint": self.fingerprint,
            "shards": [s.to_json() for s in self.shards],
            "skipped": [dataclasses.asdict(r) for r in self.skipped],
            "notes": [dataclasses.asdict(r) for r in self.notes],
            "kept": [list(entry) for entry in self.kept],
        }


def pack_dataset(config: PackConfig, **options) -> PackResult:
    """Pack config.input_dir into shards in config.output_dir, holding the output folder's lock throughout (another
    pack into the same folder is refused with `FolderBusy`, naming the process that holds it)."""
    try:
        lock = FolderLock(config.output_dir, "pack").acquire()
    except OSError as error:
        raise PackError(
            f"output folder {config.output_dir} is not writable ({error}); choose another output_dir"
        ) from error
    try:
        return _pack_dataset(config, **options)
    finally:
        lock.release()


def _pack_dataset(
    config: PackConfig,
    *,
    latent_encoder: LatentEncoder | None = None,
    text_encoder: TextEncoder | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PackResult:
    """Pack config.input_dir into shards in config.output_dir (the caller holds the folder's lock).

    progress(done, total) is called after every input file. When should_stop() returns True the shard in progress is
    discarded and PackInterrupted is raised; rerunning with the same settings resumes (see the module docstring).
    """
    if latent_encoder is None and not config.store_image:
        raise ValueError(
            "PackConfig.store_image=False and no latent_encoder: shards would hold no image data; "
            "pass a latent encoder or set store_image=True"
        )
    _prepare_output_dir(config.output_dir)
    scan = scan_images(
        config.input_dir,
        follow_external_links=config.follow_external_links,
        caption_extensions=config.sidecar_extensions,
    )
    inputs = scan.inputs
    if not inputs:
        skipped = f"; skipped: {', '.join(f'{s.path} ({s.reason})' for s in scan.skips[:5])}" if scan.skips else ""
        raise PackError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {config.input_dir}{skipped}")
    identity = pack_identity(config.output_settings(), latent_encoder, text_encoder)
    fingerprint = pack_fingerprint(identity, inputs)
    finished = _finished_pack(config, fingerprint, identity, inputs)
    if finished is not None:
        return finished
    builder = SampleBuilder.from_config(config, latent_encoder, text_encoder)
    state = _resume_state(config, fingerprint, identity, inputs)
    if state is None:
        state = _fresh_state(config, fingerprint, identity, scan, builder)
    reused = len(state.shards)
    _pack_remaining(config, inputs, state, builder, progress or (lambda done, total: None), should_stop)
    return _finalize(config, state, builder, reused)


def _prepare_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe{TEMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PackError(f"output folder {output_dir} is not writable ({error}); choose another output_dir") from error
    for stale in output_dir.glob(f".*{TEMP_SUFFIX}"):
        logger.info("removing %s left by an interrupted pack", stale)
        stale.unlink()


def _fresh_state(config, fingerprint: str, identity: dict, scan, builder: SampleBuilder) -> _Progress:
    """A new pack: the listing saved (so a changed folder can be explained later) and the scan's findings recorded."""
    write_listing(config.output_dir, identity | {"fingerprint": fingerprint}, scan.inputs)
    state = _Progress(fingerprint=fingerprint)
    state.skipped = [_Record(-1, s.path, s.reason, s.kind) for s in scan.skips]
    state.notes = [_Record(-1, s.path, s.reason, s.kind) for s in scan.notes]
    state.notes += [_Record(-1, name, note, "metadata") for name, note in builder.captions.notes]
    return state


def _finished_pack(config: PackConfig, fingerprint: str, identity: dict, inputs) -> PackResult | None:
    manifest_path = config.output_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    manifest = read_json(manifest_path)
    if manifest.get("fingerprint") != fingerprint:
        changes = describe_changes(config.output_dir, manifest.get("fingerprint"), identity, inputs)
        raise PackError(
            f"{config.output_dir} already holds a pack made from other inputs or settings ({changes}); that pack is "
            f"complete and usable as it is; to pack {config.input_dir} as it is now with these settings, delete "
            f"{config.output_dir} and pack again, or choose another output_dir"
        )
    shards = [ShardInfo.from_json(s) for s in manifest["shards"]]
    damaged = [s.name for s in shards if not shard_is_intact(config.output_dir, s)]
    if damaged:
        raise PackError(f"{config.output_dir} is a finished pack but shards {damaged} are damaged; delete and repack")
    logger.info("%s is already packed with these settings; nothing to do", config.output_dir)
    return _result(config, manifest, shards, reused=len(shards))


def _resume_state(config: PackConfig, fingerprint: str, identity: dict, inputs) -> _Progress | None:
    state_path = config.output_dir / STATE_NAME
    if not state_path.is_file():
        return None
    saved = read_json(state_path)
    if saved.get("fingerprint") != fingerprint:
        changes = describe_changes(config.output_dir, saved.get("fingerprint"), identity, inputs)
        raise PackError(
            f"{config.output_dir} holds an interrupted pack ({STATE_NAME}) of other inputs or settings ({changes}); "
            f"to continue it, restore those files and settings and run again; to pack {config.input_dir} as it is "
            f"now, delete {config.output_dir} or choose another output_dir"
        )
    recorded = [ShardInfo.from_json(s) for s in saved["shards"]]
    intact = 0
    while intact < len(recorded) and shard_is_intact(config.output_dir, recorded[intact]):
        intact += 1
    for damaged in recorded[intact:]:
        logger.warning("shard %s is missing or damaged; it will be rewritten", damaged.name)
        (config.output_dir / damaged.name).unlink(missing_ok=True)
    state = _Progress(fingerprint=fingerprint, shards=recorded[:intact])
    state.skipped = [_Record(**r) for r in saved["skipped"] if r["index"] < state.next_input]
    state.notes = [_Record(**r) for r in saved["notes"] if r["index"] < state.next_input]
    state.kept = [(i, path, sizes) for i, path, sizes in saved.get("kept", []) if i < state.next_input]
    logger.info("resuming pack in %s: keeping %d of %d shards", config.output_dir, intact, len(recorded))
    return state


def _prepared_stream(pool: ThreadPoolExecutor, window: int, builder, inputs: list[InputFile], start: int) -> Iterator:
    """(index, Prepared | skip reason) in input order; decoding runs ahead on the pool a window at a time."""
    for window_start in range(start, len(inputs), window):
        chunk = inputs[window_start : window_start + window]
        yield from enumerate(pool.map(builder.prepare, chunk), start=window_start)


def _pack_remaining(config, inputs, state: _Progress, builder, progress, should_stop) -> None:
    """Packs inputs from state.next_input on. A shard closes after the input that fills it, so the sizes of one
    image never straddle two shards (a resumed pack restarts at an input) and a multi-resolution shard may hold up
    to (resolutions - 1) samples more than samples_per_shard."""
    writer: ShardWriter | None = None
    pending: list[tuple[int, object]] = []  # (input index, Prepared) waiting for one batched encoder call

    def flush() -> None:
        nonlocal writer
        samples = builder.build_batch([prepared for _, prepared in pending])
        for position, ((index, _), sample) in enumerate(zip(pending, samples)):
            if writer is None:
                writer = ShardWriter(path=config.output_dir / f"{config.name}-{len(state.shards):06d}.tar")
            writer.add(sample)
            last_of_input = position + 1 == len(pending) or pending[position + 1][0] != index
            if writer.samples >= config.samples_per_shard and last_of_input:
                _complete_shard(config, state, writer, end_input=index + 1)
                writer = None
        pending.clear()

    progress(state.next_input, len(inputs))
    try:
        with ThreadPoolExecutor(config.num_threads, thread_name_prefix="pack") as pool:
            window = max(4 * config.num_threads, config.encode_batch)
            for index, outcome in _prepared_stream(pool, window, builder, inputs, state.next_input):
                if should_stop is not None and should_stop():
                    raise PackInterrupted(
                        f"pack of {config.input_dir} stopped after {len(state.shards)} complete shards; "
                        "run it again with the same settings to resume"
                    )
                relative = inputs[index].relative
                if isinstance(outcome, Skip):
                    state.skipped.append(_Record(index, relative, outcome.reason, outcome.kind))
                else:
                    _record_sizes(config, state, index, relative, outcome)
                    pending.extend((index, prepared) for prepared in outcome)
                    if len(pending) >= config.encode_batch:
                        flush()
                progress(index + 1, len(inputs))
            flush()
        if writer is not None:
            _complete_shard(config, state, writer, end_input=len(inputs))
            writer = None
    finally:
        if writer is not None:
            writer.abort()


def _record_sizes(config: PackConfig, state: _Progress, index: int, relative: str, prepared: list) -> None:
    """The input's notes (once, from its first size) and, in a multi-resolution pack, the sizes it was kept at."""
    state.notes.extend(_Record(index, relative, note, kind) for kind, note in prepared[0].notes)
    if not config.multi_resolution:
        return
    sizes = [p.resolution for p in prepared]
    state.kept.append((index, relative, sizes))
    missing = [r for r in config.resolutions if r not in sizes]
    if missing:
        message = (
            f"kept at {', '.join(map(str, sizes))} px only: smaller than its bucket at "
            f"{', '.join(map(str, missing))} px"
        )
        state.notes.append(_Record(index, relative, message, "fewer_sizes"))


def _complete_shard(config: PackConfig, state: _Progress, writer: ShardWriter, *, end_input: int) -> None:
    state.shards.append(writer.finish(end_input=end_input))
    write_json_atomic(config.output_dir / STATE_NAME, state.to_json(), ensure_ascii=False)
    logger.info("wrote %s (%d samples)", state.shards[-1].name, state.shards[-1].samples)


def _finalize(config: PackConfig, state: _Progress, builder: SampleBuilder, reused: int) -> PackResult:
    report_path = config.output_dir / REPORT_NAME
    samples = sum(s.samples for s in state.shards)
    report = {
        "accepted": samples,
        "skipped": [{"path": r.path, "reason": r.message, "kind": r.kind} for r in state.skipped],
        "notes": [{"path": r.path, "note": r.message, "kind": r.kind} for r in state.notes],
    }
    if config.multi_resolution:
        report |= _sizes_report(config, state)
    write_json_atomic(report_path, report, ensure_ascii=False)
    if samples == 0:
        (config.output_dir / STATE_NAME).unlink(missing_ok=True)
        why = " ".join(summary_lines([r.kind for r in state.skipped], [], total=len(state.skipped))[1:])
        raise PackError(
            f"no usable image in {config.input_dir}: all {len(state.skipped)} inputs were skipped:{why}; "
            f"see {report_path}"
        )
    buckets: dict[str, int] = {}
    for shard in state.shards:
        for name, count in shard.buckets.items():
            buckets[name] = buckets.get(name, 0) + count
    manifest = {
        "pack_version": PACK_VERSION,
        "name": config.name,
        "fingerprint": state.fingerprint,
        "samples": samples,
        "skipped": len(state.skipped),
        "buckets": dict(sorted(buckets.items())),
        RESOLUTIONS_KEY: resolution_counts(config.resolutions, state.shards),
        **manifest_statistics(state.shards),
        "contents": builder.describe(),
        "settings": config.output_settings(),
        "shards": [s.to_json() for s in state.shards],
    }
    empty_caption = builder.empty_caption_bytes()
    if empty_caption is not None:
        write_bytes_atomic(config.output_dir / EMPTY_CAPTION_NAME, empty_caption)
    write_json_atomic(config.output_dir / MANIFEST_NAME, manifest, ensure_ascii=False)
    (config.output_dir / STATE_NAME).unlink(missing_ok=True)
    logger.info("packed %d samples into %d shards, skipped %d", samples, len(state.shards), len(state.skipped))
    return _result(config, manifest, state.shards, reused=reused)


def _sizes_report(config: PackConfig, state: _Progress) -> dict:
    """report.json's record of the sizes: images stored per resolution, and every image with its resolutions."""
    per_resolution = {str(r): sum(r in sizes for _, _, sizes in state.kept) for r in config.resolutions}
    return {
        "images_per_resolution": per_resolution,
        "sizes": [{"path": path, "resolutions": sizes} for _, path, sizes in state.kept],
    }


def _result(config: PackConfig, manifest: dict, shards: list[ShardInfo], *, reused: int) -> PackResult:
    return PackResult(
        output_dir=config.output_dir,
        manifest_path=config.output_dir / MANIFEST_NAME,
        report_path=config.output_dir / REPORT_NAME,
        samples=manifest["samples"],
        skipped=manifest["skipped"],
        shards=shards,
        buckets=manifest["buckets"],
        reused_shards=reused,
        resolutions=manifest.get(RESOLUTIONS_KEY, {}),
    )
