"""Reading one checkpoint step (`checkpoint_files` describes the files): every file is checked against its digest
and against this run before anything is applied; links and anything but regular files are refused."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from ..model.safetensors_io import DTYPES, WeightsError, read_into, read_sources
from .checkpoint_files import (
    FORMAT,
    MANIFEST,
    MAX_JSON_BYTES,
    RNG_CUDA,
    RNG_TORCH,
    STEP_FOLDER,
    VERSION,
    CheckpointDamaged,
    CheckpointMismatch,
    Target,
    digest,
    expected_files,
    layout,
    path_name,
    rank_json,
    rank_tensors,
)

logger = logging.getLogger(__name__)

# Files of the pickle-based format of earlier versions (torch.distributed.checkpoint and torch.save): never read.
_PICKLED = re.compile(r"^(\.metadata|.*\.(distcp|pt|pth|pkl|pickle|bin))$")


def read_envelope(path: Path, kind: str) -> dict:
    """The body of a JSON file written by `write_envelope`, checked against its digest."""
    size = regular_file(path).st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointDamaged(f"{path} is {size} bytes, more than a checkpoint's JSON file ever is")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # bad UTF-8, bad JSON, a number too long to convert
        raise CheckpointDamaged(f"{path} is not valid JSON (truncated or overwritten?): {error}") from error
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("kind") == kind):
        raise CheckpointDamaged(f"{path} is not the {kind} file of a {FORMAT}")
    if data.get("version") != VERSION:
        raise CheckpointMismatch(
            f"{path} is format version {data.get('version')!r}; this version of the pack reads version {VERSION}"
        )
    body = data.get("body")
    if not isinstance(body, dict) or data.get("sha256") != digest(body):
        raise CheckpointDamaged(f"{path} does not match its checksum: it was altered or damaged")
    return body


def regular_file(path: Path) -> os.stat_result:
    """lstat of ``path``; a missing file, a link or anything but a regular file is refused (a FIFO would block)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError as error:
        raise CheckpointDamaged(f"{path} is missing") from error
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointDamaged(f"{path} is a link or not a regular file; checkpoints never follow links")
    return info


@dataclass
class LoadedRank:
    """One rank's part of a checkpoint, its tensors already in the target's tensors; the rest not yet applied."""

    step: int
    loader_state: dict
    extra: dict
    scheduler: dict | None
    values: dict[tuple, Any]
    rng: dict
    rng_tensors: dict[str, torch.Tensor]

    def apply_rng(self) -> None:
        version, internal, gauss = self.rng["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = self.rng["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(self.rng_tensors[RNG_TORCH])
        if RNG_CUDA in self.rng_tensors:
            torch.cuda.set_rng_state(self.rng_tensors[RNG_CUDA])


def check_manifest(folder: Path, *, step: int, world_size: int) -> None:
    body = read_envelope(folder / MANIFEST, "manifest")
    saved = body.get("world_size")
    if body.get("step") != step or not _is_int(saved) or saved < 1:
        raise CheckpointDamaged(f"{folder / MANIFEST} does not describe step {step}")
    if saved != world_size:
        raise CheckpointMismatch(
            f"checkpoint {folder} was written by {saved} ranks, this run has {world_size}: the loader positions "
            f"and RNG streams would not continue exactly. Resume with {saved} processes, or start a new run folder."
        )


def read_rank(
    folder: Path, *, rank: int, step: int, world_size: int, target: Target, scheduler_state: dict | None
) -> LoadedRank:
    """Check the manifest and rank ``rank``'s files of ``folder`` against this run; copy its tensors into
    ``target``'s (nothing else is applied: that waits until every rank read its part)."""
    check_manifest(folder, step=step, world_size=world_size)
    unknown = sorted(p.name for p in folder.iterdir() if p.name not in expected_files(world_size))
    if unknown and rank == 0:
        logger.warning("%s: ignoring files a checkpoint never holds (never read): %s", folder, unknown)
    path = folder / rank_json(rank)
    if not os.path.lexists(path):
        raise CheckpointDamaged(f"checkpoint {folder} has no state for rank {rank} ({path.name} is missing)")
    body = read_envelope(path, "rank")
    _check_body(body, path, rank=rank, step=step, world_size=world_size)
    if body["tensors"].keys() != target.tensors.keys():
        raise CheckpointMismatch(
            f"{path} holds other trainable tensors than this run ({_difference(body['tensors'], target.tensors)}). "
            "Resume with the settings that wrote it (mode, LoRA rank and targets, optimizer, EMA), or use a new run folder."
        )
    for name, entry in body["tensors"].items():
        path_in_tree, tensor = target.tensors[name]
        wanted = {"path": list(path_in_tree), **layout(tensor)}
        if entry != wanted:
            raise CheckpointMismatch(f"{path}: tensor {name!r} was saved as {entry}, this run has {wanted}")
    values = {tuple(item[0]): item[1] for item in body["values"]}
    if values.keys() != target.values.keys():
        raise CheckpointMismatch(
            f"{path} holds other optimizer values than this run ({_difference(values, target.values)})"
        )
    scheduler = body["scheduler"]
    if scheduler_state is not None and (scheduler is None or scheduler.keys() != scheduler_state.keys()):
        raise CheckpointMismatch(f"{path} holds {'no' if scheduler is None else 'another'} scheduler state")
    rng_tensors = _read_tensors(folder / rank_tensors(rank), body, target)
    _check_rng(body["rng"], rng_tensors, path)
    return LoadedRank(step, body["loader"], body["extra"], scheduler, values, body["rng"], rng_tensors)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_path(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(part, str) or _is_int(part) for part in value)


def _check_body(body: dict, path: Path, *, rank: int, step: int, world_size: int) -> None:
    """The types the reader relies on (the digest says the file is as written, not that a writer was honest)."""
    checks = {
        f"is not rank {rank}'s state of step {step} of {world_size} ranks": all(
            _is_int(body.get(key)) and body[key] == want
            for key, want in (("step", step), ("rank", rank), ("world_size", world_size))
        ),
        "its loader, extra or scheduler state is not an object": isinstance(body.get("loader"), dict)
        and isinstance(body.get("extra"), dict)
        and (body.get("scheduler") is None or isinstance(body.get("scheduler"), dict)),
        "its list of values is malformed": isinstance(body.get("values"), list)
        and all(isinstance(item, list) and len(item) == 2 and _is_path(item[0]) for item in body["values"]),
        "its tensor index is malformed": isinstance(body.get("tensors"), dict)
        and all(isinstance(entry, dict) for entry in body["tensors"].values()),
        "its tensor file entry is malformed": isinstance(body.get("tensor_file"), dict)
        and body["tensor_file"].get("name") == rank_tensors(rank)
        and _is_int(body["tensor_file"].get("bytes"))
        and isinstance(body["tensor_file"].get("sha256"), str),
        "its RNG state is malformed": isinstance(body.get("rng"), dict)
        and isinstance(body["rng"].get("python"), list)
        and isinstance(body["rng"].get("numpy"), list),
    }
    for problem, ok in checks.items():
        if not ok:
            raise CheckpointDamaged(f"{path}: {problem}")


def _difference(saved: dict, wanted: dict) -> str:
    def some(keys) -> str:
        names = sorted(path_name(k) if isinstance(k, tuple) else k for k in keys)
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    missing, unexpected = wanted.keys() - saved.keys(), saved.keys() - wanted.keys()
    return "; ".join(
        part
        for part in (missing and f"missing {some(missing)}", unexpected and f"not in this run {some(unexpected)}")
        if part
    )


def _read_tensors(path: Path, body: dict, target: Target) -> dict[str, torch.Tensor]:
    """Copy the tensor file into the target's tensors front to back, hashing every byte; returns the RNG tensors."""
    size, written = regular_file(path).st_size, body["tensor_file"]
    if size != written["bytes"]:
        raise CheckpointDamaged(f"{path} is {size} bytes but {written['bytes']} were written: truncated or replaced")
    try:
        sources = read_sources(path)
    except WeightsError as error:
        raise CheckpointDamaged(str(error)) from error
    index, rng_names = body["tensors"], {RNG_TORCH, RNG_CUDA} & sources.keys()
    if RNG_TORCH not in sources or sources.keys() != index.keys() | rng_names:
        raise CheckpointDamaged(f"{path} holds other tensors than {rank_json(body['rank'])} lists")
    for name, entry in index.items():
        if (sources[name].dtype, list(sources[name].shape)) != (entry.get("dtype"), entry.get("shape")):
            raise CheckpointDamaged(f"{path}: tensor {name!r} is not the dtype and shape its index says")
    hasher, rng = hashlib.sha256(), {}
    try:
        with open(path, "rb") as file, torch.no_grad():
            prefix = file.read(8)
            hasher.update(prefix + file.read(struct.unpack("<Q", prefix)[0]))
            position = file.tell()
            for source in sorted(sources.values(), key=lambda s: s.start):
                if source.start != position:
                    raise CheckpointDamaged(f"{path} has bytes between its tensors that no tensor owns")
                buffer = torch.empty(source.shape, dtype=DTYPES[source.dtype])
                read_into(file, source, buffer)
                hasher.update(buffer.reshape(-1).view(torch.uint8).numpy())
                if source.key in rng_names:
                    rng[source.key] = buffer
                else:
                    tensor = target.tensors[source.key][1]
                    (tensor.to_local() if isinstance(tensor, DTensor) else tensor).copy_(buffer)
                position = source.end
    except (WeightsError, OSError) as error:
        raise CheckpointDamaged(f"{path} could not be read: {error}") from error
    if position != size or hasher.hexdigest() != written["sha256"]:
        raise CheckpointDamaged(f"{path} does not match its SHA-256 in {rank_json(body['rank'])}: damaged or altered")
    return rng


def _check_rng(state: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Try the saved RNG states on scratch generators, so that applying them later cannot fail."""
    try:
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.RandomState().set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.Generator().set_state(tensors[RNG_TORCH])
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise CheckpointDamaged(f"{path}: its RNG state is not valid ({error})") from error
    if RNG_CUDA in tensors:
        if not torch.cuda.is_available():
            raise CheckpointMismatch(f"{path} holds a CUDA RNG state but CUDA is not available; resume on a GPU")
        if tensors[RNG_CUDA].shape != torch.cuda.get_rng_state().shape:
            raise CheckpointDamaged(f"{path}: its CUDA RNG state has the wrong size")


def refuse_pickled_folders(root: Path, *, have_checkpoints: bool) -> None:
    """Step folders of the pickle-based format of earlier versions are never read: refused when no readable
    checkpoint exists (resuming would silently start over), else logged and left alone."""
    pickled = _pickled_step_folders(root)
    if not pickled:
        return
    described = "; ".join(f"{name}: {', '.join(files)}" for name, files in pickled.items())
    if have_checkpoints:
        logger.warning("%s: ignoring step folders in a pickle-based format (never read): %s", root, described)
        return
    raise ValueError(
        f"{root} holds checkpoints in a pickle-based format ({described}). They are never loaded: unpickling a file "
        "can run any code it contains. Move that folder away to start this run over, or set run.resume=false; a "
        "checkpoint from an earlier version of the pack cannot be resumed."
    )


def _pickled_step_folders(root: Path) -> dict[str, list[str]]:
    """Step folders without a manifest that hold files of the pickle-based format: {folder name: file names}."""
    found = {}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if STEP_FOLDER.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            if not (entry / MANIFEST).is_file():
                files = sorted(p.name for p in entry.iterdir() if _PICKLED.match(p.name))
                if files:
                    found[entry.name] = files
    return found
