"""The files of one checkpoint step: plain JSON and safetensors, written and read without pickle.

Inside ``step-NNNNNN/`` each rank r writes::

    rank-0000r.safetensors  its tensors: trainable weights and optimizer state (its own shards under FSDP2), its
                            torch (and CUDA) RNG states
    rank-0000r.json         plain data: step, world size, loader position, scheduler, extra, the Python and NumPy RNG
                            states, the optimizer's other values (learning rates, betas, ...), and for each tensor its
                            place in the state tree, dtype and shape, and for a DTensor shard the global shape,
                            placements, mesh shape and offset; the size and SHA-256 of the tensor file

and rank 0 writes ``checkpoint.json`` (format, version, step, world size) once every rank's files are on disk.

Each JSON file carries the SHA-256 of its own body, and each rank's JSON the digest of its tensor file: a truncated
or altered file is found before anything is applied (`CheckpointDamaged`). A checkpoint that is intact but does not
fit this run (another world size, other trainable weights) is a `CheckpointMismatch`. The tensor file is read once,
front to back, hashing as it goes, straight into the model's and the optimizer's own tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from ..atomic import write_json_atomic
from ..model.safetensors_io import DTYPE_NAMES, DTYPES, WeightsError, read_into, read_sources, write_safetensors

FORMAT = "whetstone-checkpoint"
VERSION = 1
MANIFEST = "checkpoint.json"
MAX_JSON_BYTES = 64 * 2**20
RNG_TORCH, RNG_CUDA = "rng/torch", "rng/cuda"
_HASH_CHUNK = 16 * 2**20


class CheckpointDamaged(ValueError):
    """A checkpoint file that is missing, truncated, altered or not of this format: an older checkpoint may do."""


class CheckpointMismatch(ValueError):
    """An intact checkpoint that does not fit this run (world size, trainable weights, format version)."""


def rank_json(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def rank_tensors(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def expected_files(world_size: int) -> set[str]:
    return {MANIFEST} | {rank_json(r) for r in range(world_size)} | {rank_tensors(r) for r in range(world_size)}


# ---------------------------------------------------------------------- plain data


def plain(value: Any, where: str) -> Any:
    """``value`` as JSON keeps it (tuples become lists), or a ValueError naming the first part JSON cannot keep."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r} ({type(key).__name__}); checkpoints keep string keys")
        return {key: plain(item, f"{where}[{key!r}]") for key, item in value.items()}
    raise ValueError(
        f"{where} holds a {type(value).__name__}; checkpoints keep dicts (string keys), lists, numbers, strings, "
        "booleans and None (plain JSON)"
    )


def _digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_envelope(path: Path, kind: str, body: dict) -> None:
    envelope = {"format": FORMAT, "version": VERSION, "kind": kind, "sha256": _digest(body), "body": body}
    write_json_atomic(path, envelope, indent=None)


def read_envelope(path: Path, kind: str) -> dict:
    """The body of a JSON file written by `write_envelope`, checked against its digest."""
    size = _regular_file(path).st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointDamaged(f"{path} is {size} bytes, more than a checkpoint's JSON file ever is")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointDamaged(f"{path} is not valid JSON (truncated or overwritten?): {error}") from error
    if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("kind") == kind):
        raise CheckpointDamaged(f"{path} is not the {kind} file of a {FORMAT}")
    if data.get("version") != VERSION:
        raise CheckpointMismatch(
            f"{path} is format version {data.get('version')!r}; this version of the pack reads version {VERSION}"
        )
    body = data.get("body")
    if not isinstance(body, dict) or data.get("sha256") != _digest(body):
        raise CheckpointDamaged(f"{path} does not match its checksum: it was altered or damaged")
    return body


def _regular_file(path: Path) -> os.stat_result:
    """lstat of ``path``; a missing file, a link or anything but a regular file is refused (a FIFO would block)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError as error:
        raise CheckpointDamaged(f"{path} is missing") from error
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointDamaged(f"{path} is a link or not a regular file; checkpoints never follow links")
    return info


# ---------------------------------------------------------------------- the state tree


def flatten(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) of a tree of dicts and lists; a path is a tuple of dict keys (str, int) and list indices."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ValueError(f"state key {key!r} under {_name(prefix)!r} is a {type(key).__name__}, not a str/int")
            yield from flatten(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from flatten(value, (*prefix, index))
    else:
        yield prefix, tree


def _name(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def _layout(tensor: torch.Tensor) -> dict:
    """What must match for a saved tensor to go back into ``tensor``: dtype, this rank's shape, DTensor layout."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if local.dtype not in DTYPE_NAMES:
        raise ValueError(f"cannot checkpoint a {local.dtype} tensor: safetensors has no such dtype")
    layout = {"dtype": DTYPE_NAMES[local.dtype], "shape": list(local.shape), "dtensor": None}
    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        layout["dtensor"] = {
            "global_shape": list(tensor.shape),
            "placements": [str(placement) for placement in tensor.placements],
            "mesh_shape": list(tensor.device_mesh.shape),
            "offset": [int(o) for o in offset],
        }
    return layout


@dataclass
class Target:
    """The state tree to restore into: its tensors are the model's and the optimizer's own (or DTensor shards)."""

    tree: dict
    tensors: dict[str, tuple[tuple, torch.Tensor]]  # name -> (path, tensor)
    values: dict[tuple, Any]  # path -> the value it holds now (learning rates, betas, parameter names, ...)

    @classmethod
    def of(cls, tree: dict) -> Target:
        tensors, values = {}, {}
        for path, leaf in flatten(tree):
            if not isinstance(leaf, torch.Tensor):
                values[path] = leaf
            elif _name(path) in tensors:
                raise ValueError(f"two tensors of the training state are both named {_name(path)!r}")
            else:
                tensors[_name(path)] = (path, leaf)
        return cls(tree, tensors, values)

    def apply_values(self, values: dict[tuple, Any]) -> None:
        for path, value in values.items():
            node = self.tree
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = tuple(value) if isinstance(node[path[-1]], tuple) else value


# ---------------------------------------------------------------------- writing


@dataclass
class StagedRank:
    """One rank's checkpoint, ready to write: plain data and (name, tensor) pairs."""

    body: dict
    tensors: list[tuple[str, torch.Tensor]]


def stage_rank(
    *, step: int, rank: int, world_size: int, state: dict, scheduler: Any, loader_state: dict, extra: dict, copy: bool
) -> StagedRank:
    """This rank's state as it is now; with ``copy`` every tensor is copied to CPU memory (training may go on)."""
    target = Target.of(state)
    tensors, index = [], {}
    for name, (path, tensor) in target.tensors.items():
        local = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach()
        tensors.append((name, local.to("cpu", copy=True) if copy else local))
        index[name] = {"path": list(path), **_layout(tensor)}
    values = [[list(path), plain(value, f"training state {_name(path)!r}")] for path, value in target.values.items()]
    rng_tensors, rng = _rng_state()
    body = {
        "step": step,
        "rank": rank,
        "world_size": world_size,
        "loader": plain(loader_state, "loader_state"),
        "scheduler": plain(scheduler.state_dict(), "scheduler state") if scheduler is not None else None,
        "extra": plain(extra, "extra"),
        "rng": rng,
        "values": values,
        "tensors": index,
    }
    return StagedRank(body, tensors + rng_tensors)


def write_rank(folder: Path, staged: StagedRank) -> None:
    """The tensor file first, then the JSON that names its digest (each written atomically)."""
    rank, step = staged.body["rank"], staged.body["step"]
    path = folder / rank_tensors(rank)
    hasher = hashlib.sha256()
    write_safetensors(path, staged.tensors, {"format": FORMAT, "step": str(step), "rank": str(rank)}, hasher=hasher)
    tensor_file = {"name": path.name, "bytes": path.stat().st_size, "sha256": hasher.hexdigest()}
    write_envelope(folder / rank_json(rank), "rank", {**staged.body, "tensor_file": tensor_file})


def write_manifest(folder: Path, *, step: int, world_size: int) -> None:
    write_envelope(folder / MANIFEST, "manifest", {"step": step, "world_size": world_size})


def _rng_state() -> tuple[list[tuple[str, torch.Tensor]], dict]:
    tensors = [(RNG_TORCH, torch.get_rng_state())]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.append((RNG_CUDA, torch.cuda.get_rng_state()))  # this rank's current device
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, {"python": [version, list(internal), gauss], "numpy": numpy_state}


# ---------------------------------------------------------------------- reading


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
    """Check rank ``rank``'s files of ``folder`` against this run and copy its tensors into ``target``'s."""
    path = folder / rank_json(rank)
    if not os.path.lexists(path):
        raise CheckpointDamaged(f"checkpoint {folder} has no state for rank {rank} ({path.name} is missing)")
    body = read_envelope(path, "rank")
    _check_body(body, path, rank=rank, step=step, world_size=world_size)
    if body["tensors"].keys() != target.tensors.keys():
        raise CheckpointMismatch(
            f"{path} holds other trainable tensors than this run ({_difference(body['tensors'], target.tensors)}). "
            "Resume with the settings that wrote it (mode, LoRA rank and targets, optimizer), or use a new run folder."
        )
    for name, entry in body["tensors"].items():
        path_in_tree, tensor = target.tensors[name]
        wanted = {"path": list(path_in_tree), **_layout(tensor)}
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
        names = sorted(_name(k) if isinstance(k, tuple) else k for k in keys)
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    missing, unexpected = wanted.keys() - saved.keys(), saved.keys() - wanted.keys()
    return "; ".join(
        part
        for part in (missing and f"missing {some(missing)}", unexpected and f"not in this run {some(unexpected)}")
        if part
    )


def _read_tensors(path: Path, body: dict, target: Target) -> dict[str, torch.Tensor]:
    """Copy the tensor file into the target's tensors front to back, hashing every byte; returns the RNG tensors."""
    size, written = _regular_file(path).st_size, body["tensor_file"]
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
