"""Packing one folder on many processes: ``torchrun --nproc_per_node N [--nnodes M ...] -m training pack ...``.

Every rank lists the same sorted inputs (their fingerprints are compared). The inputs are cut into blocks of
samples_per_shard; rank r encodes blocks r, r + N, ... on its own device (the encoders and features of the
single-process pack) into parts (see pack_parts.py). When every rank is done, the accepted samples of all blocks,
in input order, are cut into shards of samples_per_shard exactly as one process cuts them, shard k written by rank
k mod N; rank 0 then writes report.json and manifest.json through the single-process pack's own finalisation. So
the shards, manifest and report are byte-identical to a single-process pack of the folder whenever every rank's
encoders compute what the single process's compute: each sample's encoding must not depend on the other samples
of its encoder batch (always so with encode_batch 1, the default), and on CPU the thread count must match (torchrun
gives its workers OMP_NUM_THREADS=1, and a convolution summed over other threads rounds differently).

Every phase ends with all ranks agreeing: a rank that fails or is stopped makes every rank raise (PackInterrupted
or PackError naming the rank), so none waits for it. An interrupted pack resumes: rerun the same command, with any
number of ranks; parts that verify are kept. The output folder must be one folder every rank sees (rank 0 takes its
lock and every rank checks that it sees the lock file).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from ..atomic import write_json_atomic
from ..lock import LOCK_FILE, FolderLock
from .changes import describe_changes, pack_fingerprint, pack_identity, write_listing
from .encoders import LatentEncoder, TextEncoder
from .images import IMAGE_EXTENSIONS
from .inputs import scan_images
from .pack import (
    PackConfig,
    PackError,
    PackInterrupted,
    PackResult,
    _finalize,
    _finished_pack,
    _prepare_output_dir,
    _Progress,
    _Record,
)
from .pack_parts import (
    PARTS_DIR,
    block_range,
    completed_part,
    encode_block,
    read_part,
    write_shard,
)
from .samples import SampleBuilder
from .shards import STATE_NAME, ShardInfo, read_json

logger = logging.getLogger(__name__)

PARTS_STATE = "pack.json"
#: How long a collective waits: ranks wait for the slowest one's encoding. A rank that dies ends the job through
#: torchrun (its agent stops the others), not through this timeout.
COLLECTIVE_TIMEOUT = timedelta(days=7)


class Group(Protocol):
    """The ranks of a pack: `gather(value)` returns every rank's value, in rank order (a collective)."""

    rank: int
    world_size: int

    def gather(self, value) -> list: ...


@dataclass(kw_only=True)
class TorchGroup:
    """The default torch.distributed process group (gloo: only small Python values travel between ranks)."""

    rank: int
    world_size: int

    def gather(self, value) -> list:
        import torch.distributed as dist

        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


@contextlib.contextmanager
def torchrun_group() -> Iterator[TorchGroup | None]:
    """The pack's process group when started by torchrun with more than one rank (WORLD_SIZE > 1), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        group = TorchGroup(rank=dist.get_rank(), world_size=dist.get_world_size())
        logger.info("distributed pack: rank %d of %d", group.rank, group.world_size)
        yield group
    finally:
        dist.destroy_process_group()


def _agreed(group: Group, what: str, work: Callable[[], object]):
    """work() on this rank, then every rank learns whether all succeeded; a failure anywhere raises everywhere."""
    own: BaseException | None = None
    outcome = None
    value = None
    try:
        value = work()
    except PackInterrupted as error:
        own, outcome = error, ("interrupted", str(error))
    except Exception as error:
        own, outcome = error, ("error", f"{type(error).__name__}: {error}" if not _is_user_error(error) else str(error))
    outcomes = group.gather(outcome)
    if own is not None:
        raise own
    for rank, failed in enumerate(outcomes):
        if failed is not None:
            kind, message = failed
            raised = PackInterrupted if kind == "interrupted" else PackError
            raise raised(f"rank {rank} stopped the pack while {what}: {message}")
    return value


def _is_user_error(error: Exception) -> bool:
    return isinstance(error, (PackError, ValueError))


def pack_distributed(
    config: PackConfig,
    *,
    group: Group,
    latent_encoder: LatentEncoder | None = None,
    text_encoder: TextEncoder | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PackResult | None:
    """This rank's share of a distributed pack (see the module docstring). Rank 0 returns the result (its
    reused_shards counts the parts kept from an interrupted run), the other ranks None. progress(done, total)
    counts this rank's own inputs."""
    if latent_encoder is None and not config.store_image:
        raise ValueError(
            "PackConfig.store_image=False and no latent_encoder: shards would hold no image data; "
            "pass a latent encoder or set store_image=True"
        )
    if config.multi_resolution:  # its shards close at input boundaries, which the block cutting here does not follow
        raise PackError(
            f"--resolution {','.join(map(str, config.resolutions))}: a distributed pack packs one resolution; pack "
            "several resolutions on one process (without torchrun), or one resolution per distributed pack"
        )
    lock = _agreed(group, "taking the output folder", lambda: _take_folder(config, group.rank))
    try:
        _agreed(group, "checking the output folder is shared", lambda: _check_shared(config.output_dir, group.rank))
        return _pack(config, group, latent_encoder, text_encoder, progress, should_stop)
    finally:
        if lock is not None:
            lock.release()


def _take_folder(config: PackConfig, rank: int) -> FolderLock | None:
    if rank != 0:
        return None
    try:
        lock = FolderLock(config.output_dir, "pack").acquire()
    except OSError as error:
        raise PackError(f"output folder {config.output_dir} is not writable ({error}); choose another") from error
    try:
        _prepare_output_dir(config.output_dir)
        (config.output_dir / PARTS_DIR).mkdir(exist_ok=True)
        _prepare_output_dir(config.output_dir / PARTS_DIR)  # removes the temporary files of a killed rank
    except BaseException:
        lock.release()
        raise
    return lock


def _check_shared(output_dir: Path, rank: int) -> None:
    if not (output_dir / LOCK_FILE).is_file():
        raise PackError(
            f"rank {rank} does not see {output_dir / LOCK_FILE}, which rank 0 holds: the output folder is not one "
            "shared folder; put it on a file system every node mounts at the same path"
        )


def _pack(config, group: Group, latent_encoder, text_encoder, progress, should_stop) -> PackResult | None:
    scan = _agreed(group, "listing the inputs", lambda: scan_images(
        config.input_dir, follow_external_links=config.follow_external_links,
        caption_extensions=config.sidecar_extensions,
    ))  # fmt: skip
    identity = pack_identity(config.output_settings(), latent_encoder, text_encoder)
    fingerprint = pack_fingerprint(identity, scan.inputs)
    fingerprints = group.gather(fingerprint)
    if len(set(fingerprints)) != 1:
        raise PackError(
            f"the ranks see different inputs or settings in {config.input_dir} (fingerprints {fingerprints}); give "
            "every rank the same command and one shared input folder"
        )
    if not scan.inputs:
        raise PackError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {config.input_dir}")
    finished = _agreed(
        group, "checking for a finished pack", lambda: _start(config, group, identity, fingerprint, scan)
    )
    if any(group.gather(finished is not None)):  # every rank takes part in the gather before any returns
        return finished
    builder = _agreed(
        group, "reading captions", lambda: SampleBuilder.from_config(config, latent_encoder, text_encoder)
    )
    counts, reused = _agreed(
        group, "encoding", lambda: _encode_mine(config, group, builder, scan.inputs, fingerprint, progress, should_stop)
    )
    everything = {}
    for share in group.gather(counts):
        everything.update(share)
    blocks = _Blocks(config, fingerprint, len(scan.inputs), [everything[block] for block in range(len(everything))])
    shards = _agreed(group, "writing shards", lambda: _write_my_shards(config, group, blocks))
    all_shards = sorted((info for share in group.gather(shards) for info in share), key=lambda info: info.name)
    reused_total = sum(group.gather(reused))
    return _agreed(
        group, "writing the manifest",
        lambda: _finish(config, group, fingerprint, scan, builder, blocks, all_shards, reused_total),
    )  # fmt: skip


@dataclass
class _Blocks:
    """Every block's accepted-sample count (gathered from the ranks) and its part record, read when needed."""

    config: PackConfig
    fingerprint: str
    total_inputs: int
    counts: list[int]

    def record(self, block: int) -> dict:
        span = block_range(block, self.config.samples_per_shard, self.total_inputs)
        record = read_part(self.config.output_dir / PARTS_DIR, block, span, self.fingerprint)
        if len(record["samples"]) != self.counts[block]:
            raise PackError(f"part {block} changed while the pack ran; delete {self.config.output_dir} and repack")
        return record


def _start(config, group: Group, identity: dict, fingerprint: str, scan) -> PackResult | None:
    """Rank 0: a finished pack of these inputs is returned as it is; an interrupted one is checked to be ours."""
    if group.rank != 0:
        return None
    finished = _finished_pack(config, fingerprint, identity, scan.inputs)
    if finished is not None:
        shutil.rmtree(config.output_dir / PARTS_DIR)
        return finished
    if (config.output_dir / STATE_NAME).is_file():
        raise PackError(
            f"{config.output_dir} holds an interrupted single-process pack ({STATE_NAME}); finish it without "
            "torchrun, or delete the folder to pack it on several ranks"
        )
    state_path = config.output_dir / PARTS_DIR / PARTS_STATE
    if state_path.is_file():
        saved = read_json(state_path).get("fingerprint")
        if saved != fingerprint:
            changes = describe_changes(config.output_dir, saved, identity, scan.inputs)
            raise PackError(
                f"{config.output_dir} holds an interrupted distributed pack of other inputs or settings ({changes}); "
                f"restore them to continue it, or delete {config.output_dir} or choose another output_dir"
            )
        logger.info("resuming the distributed pack in %s", config.output_dir)
    else:
        write_listing(config.output_dir, identity | {"fingerprint": fingerprint}, scan.inputs)
        write_json_atomic(state_path, {"fingerprint": fingerprint})
    return None


def _encode_mine(config, group: Group, builder, inputs, fingerprint: str, progress, should_stop):
    """Encode this rank's blocks that no earlier run completed; ({block: accepted samples}, parts reused)."""
    parts = config.output_dir / PARTS_DIR
    size = config.samples_per_shard
    mine = range(group.rank, math.ceil(len(inputs) / size), group.world_size)
    records, todo = {}, []
    for block in mine:
        record = completed_part(parts, block, block_range(block, size, len(inputs)), fingerprint)
        if record is None:
            todo.append(block)
        else:
            records[block] = record
    total = sum(len(block_range(block, size, len(inputs))) for block in mine)
    done = total - sum(len(block_range(block, size, len(inputs))) for block in todo)
    logger.info("rank %d: %d of its %d blocks to encode (%d kept)", group.rank, len(todo), len(mine), len(records))
    report = progress or (lambda done, total: None)
    report(done, total)

    def counted() -> None:
        nonlocal done
        done += 1
        report(done, total)

    with ThreadPoolExecutor(config.num_threads, thread_name_prefix="pack") as pool:
        for block in todo:
            records[block] = encode_block(
                parts=parts, block=block, inputs=inputs, span=block_range(block, size, len(inputs)), builder=builder,
                pool=pool, window=max(4 * config.num_threads, config.encode_batch), encode_batch=config.encode_batch,
                fingerprint=fingerprint, should_stop=should_stop, on_input=counted,
            )  # fmt: skip
    return {block: len(record["samples"]) for block, record in records.items()}, len(mine) - len(todo)


def _write_my_shards(config, group: Group, blocks: _Blocks) -> list[ShardInfo]:
    """Shards k = rank, rank + N, ... of the accepted samples in input order, samples_per_shard each."""
    size = config.samples_per_shard
    starts, accepted = [], 0
    for count in blocks.counts:
        starts.append(accepted)
        accepted += count
    written, cached = [], {}
    for number in range(group.rank, math.ceil(accepted / size), group.world_size):
        low, high = number * size, min((number + 1) * size, accepted)
        pieces = []
        for block, (count, start) in enumerate(zip(blocks.counts, starts)):
            if start < high and start + count > low:
                record = cached.get(block) or blocks.record(block)
                cached = {block: record}  # the next shard starts in this block or a later one
                pieces.append((block, record, max(low - start, 0), min(high - start, count)))
        last = high == accepted and high - low < size
        written.append(
            write_shard(output_dir=config.output_dir, name=config.name, number=number, pieces=pieces,
                        parts=config.output_dir / PARTS_DIR, last=last, total_inputs=blocks.total_inputs)
        )  # fmt: skip
    return written


def _finish(config, group: Group, fingerprint, scan, builder, blocks, shards, reused: int) -> PackResult | None:
    if group.rank != 0:
        return None
    state = _Progress(fingerprint=fingerprint, shards=shards)
    state.skipped = [_Record(-1, s.path, s.reason, s.kind) for s in scan.skips]
    state.notes = [_Record(-1, s.path, s.reason, s.kind) for s in scan.notes]
    state.notes += [_Record(-1, name, note, "metadata") for name, note in builder.captions.notes]
    for block in range(len(blocks.counts)):  # in input order, as one process records them
        record = blocks.record(block)
        state.skipped += [_Record(**entry) for entry in record["skipped"]]
        state.notes += [_Record(**entry) for entry in record["notes"]]
    result = _finalize(config, state, builder, reused)
    shutil.rmtree(config.output_dir / PARTS_DIR)
    return result
