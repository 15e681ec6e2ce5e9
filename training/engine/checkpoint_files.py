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
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.tensor import DTensor

from ..atomic import write_json_atomic
from ..model.safetensors_io import DTYPE_NAMES, write_safetensors

FORMAT = "whetstone-checkpoint"
VERSION = 1
MANIFEST = "checkpoint.json"
STEP_FOLDER = re.compile(r"^step-(\d{6,})$")  # a complete checkpoint's folder (with its manifest)
MAX_JSON_BYTES = 64 * 2**20
RNG_TORCH, RNG_CUDA = "rng/torch", "rng/cuda"
# Wrapper prefixes that get_state_dict strips from names (DDP, torch.compile, activation checkpointing).
_WRAPPERS = ("module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


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


def digest(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_envelope(path: Path, kind: str, body: dict) -> None:
    envelope = {"format": FORMAT, "version": VERSION, "kind": kind, "sha256": digest(body), "body": body}
    write_json_atomic(path, envelope, indent=None)


# ---------------------------------------------------------------------- the state tree


def flatten(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) of a tree of dicts and lists; a path is a tuple of dict keys (str, int) and list indices."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise ValueError(
                    f"state key {key!r} under {path_name(prefix)!r} is a {type(key).__name__}, not a str/int"
                )
            yield from flatten(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from flatten(value, (*prefix, index))
    else:
        yield prefix, tree


def path_name(path: tuple) -> str:
    return "/".join(str(part) for part in path)


def layout(tensor: torch.Tensor) -> dict:
    """What must match for a saved tensor to go back into ``tensor``: dtype, this rank's shape, DTensor layout."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if local.dtype not in DTYPE_NAMES:
        raise ValueError(f"cannot checkpoint a {local.dtype} tensor: safetensors has no such dtype")
    described = {"dtype": DTYPE_NAMES[local.dtype], "shape": list(local.shape), "dtensor": None}
    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        described["dtensor"] = {
            "global_shape": list(tensor.shape),
            "placements": [repr(placement) for placement in tensor.placements],
            "mesh_shape": list(tensor.device_mesh.shape),
            "offset": [int(o) for o in offset],
        }
    return described


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
            elif path_name(path) in tensors:
                raise ValueError(f"two tensors of the training state are both named {path_name(path)!r}")
            else:
                tensors[path_name(path)] = (path, leaf)
        return cls(tree, tensors, values)

    def apply_values(self, values: dict[tuple, Any]) -> None:
        for path, value in values.items():
            node = self.tree
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = tuple(value) if isinstance(node[path[-1]], tuple) else value


def train_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """{'model', 'optim'} as get_state_dict gives them; only trainable tensors when part of the model is frozen.
    ``ema``: the EMA's shadow tensors (``training.engine.ema``), saved under 'ema' and restored into in place."""
    frozen = {_clean_name(n) for n, p in model.named_parameters() if not p.requires_grad}
    options = StateDictOptions(ignore_frozen_params=bool(frozen))
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if frozen:  # also drop tensors hanging off frozen weights (4-bit quantisation state: 'w.absmax', ...)
        model_state = {k: v for k, v in model_state.items() if not any(k.startswith(f + ".") for f in frozen)}
        trainable = {_clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
        assert trainable <= model_state.keys(), f"trainable weights missing: {sorted(trainable - model_state.keys())}"
    state = {"model": model_state, "optim": optim_state}
    return state if ema is None else {**state, "ema": ema}


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


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
        index[name] = {"path": list(path), **layout(tensor)}
    values = [
        [list(path), plain(value, f"training state {path_name(path)!r}")] for path, value in target.values.items()
    ]
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
