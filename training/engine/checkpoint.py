"""Resumable training state through ``torch.distributed.checkpoint`` (DCP), saved asynchronously.

Layout of ``<run>/checkpoints/``::

    step-000100/                 complete: visible only once every rank's data and the metadata are on disk
        .metadata, __*_*.distcp  DCP: trainable weights and optimizer state, sharded as the model is (DDP, FSDP2)
        rank-00000.pt            per rank: RNG states, loader position, scheduler, step, extra (torch.save)
    .step-000200.<token>/        being written; renamed to step-000200 by rank 0 once DCP's save returned there
    .step-000050.removing-<token>/  pruned: hidden first, then deleted (a kill in between leaves nothing visible)

Hidden folders are what a kill leaves behind; rank 0 deletes them when the next attempt starts.

Only trainable parameters are saved when any parameter is frozen (LoRA, QLoRA): the base model is never copied.
Every rank must construct the Checkpointer and call `save`, `load` and `close` at the same point (they are collective
when a process group is initialised); `latest_step` and `wait` are local.

An asynchronous save copies the state to CPU memory in the caller's thread, then writes it in a daemon thread of its
own (not `dcp.async_save`'s executor, whose thread the interpreter joins at exit: a writer stuck in a collective would
keep the process alive). The writer reports its outcome exactly once (an Event set in a ``finally``); `wait` gives up
after ``timeout_s`` with an error naming the step and run folder, and the checkpoint's gloo group times out after the
same time, so a dead peer cannot hold a writer forever. Call `close` before destroying the process groups.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..atomic import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
DEFAULT_TIMEOUT_S = 600.0  # the longest a checkpoint may take to write (and its collectives wait for other ranks)
_COMPLETE = re.compile(r"^step-(\d{6,})$")
_PLAIN = (str, int, float, bool, type(None), torch.Tensor)
# Wrapper prefixes that get_state_dict strips from names (DDP, torch.compile, activation checkpointing).
_WRAPPERS = ("module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(eq=False)
class _Write:
    """One background save; ``done`` is set exactly once, when it succeeded (error None) or failed."""

    step: int
    partial: Path
    started: float
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Checkpointer:
    """Save and restore everything a run needs to continue exactly; keep the newest ``keep`` checkpoints."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        rank: int,
        world_size: int,
        keep: int = 2,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"Checkpointer needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if keep < 1:
            raise ValueError(f"Checkpointer keep must be >= 1 (checkpoints kept), got {keep}")
        if not timeout_s > 0:
            raise ValueError(f"Checkpointer timeout_s must be > 0 (seconds a save may take), got {timeout_s}")
        self.root = Path(run_dir) / CHECKPOINTS
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.timeout_s = timeout_s
        self._distributed = dist.is_available() and dist.is_initialized()
        if self._distributed and dist.get_world_size() != world_size:
            raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
        # A gloo group of its own: the writer thread must not interleave collectives with the training
        # thread's on the default group, and async save needs a CPU backend even when training uses NCCL. Its
        # timeout bounds a writer waiting for a dead peer (new_group's default is 30 minutes, not the run's).
        timeout = timedelta(seconds=timeout_s)
        self._group = dist.new_group(backend="gloo", timeout=timeout) if self._distributed else None
        self._closed = False
        self._token = self._shared_token()
        self._pending: _Write | None = None
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_partials()
        self._barrier()

    # ------------------------------------------------------------------ public API

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self._complete_steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loader_state: dict,
        extra: dict,
        async_save: bool = True,
    ) -> None:
        """Write checkpoint ``step``. With ``async_save`` the tensors are copied to CPU now and written in the
        background; call `wait` or `close` before exiting. A previous pending save is waited for first."""
        self._require_open("save")
        self.wait()
        _require_plain(loader_state, "loader_state")
        _require_plain(extra, "extra")
        partial = self.root / f".{step_dir_name(step)}.{self._token}"
        partial.mkdir(parents=True, exist_ok=True)
        _save_rank_file(
            partial / _rank_file(self.rank),
            {
                "step": step,
                "world_size": self.world_size,
                "rng": _rng_state(),
                "loader": loader_state,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "extra": extra,
            },
        )
        state = _train_state(model, optimizer)
        started = time.perf_counter()
        if async_save:
            staged = _stage(state)  # training may change the weights as soon as this returns
            write = _Write(step=step, partial=partial, started=started)
            writer = threading.Thread(target=self._write, args=(staged, write), name=f"checkpoint-{step}", daemon=True)
            self._pending = write
            writer.start()
            logger.info("checkpoint step %d: staged in %.2f s, writing in the background", step, _since(started))
        else:
            dcp.save(state, checkpoint_id=str(partial), **self._dcp_kwargs())
            self._finalize(step, partial, started)

    def wait(self, timeout_s: float | None = None) -> None:
        """Block until the pending asynchronous save is written (at most ``timeout_s``, default the Checkpointer's);
        raise its error, if any. After a timeout the save stays pending: a later `wait` or `save` waits for it again.
        """
        write = self._pending
        if write is None:
            return
        limit = self.timeout_s if timeout_s is None else timeout_s
        if not write.done.wait(limit):
            raise TimeoutError(
                f"checkpoint step {write.step} was not written within {limit:g} s on rank {self.rank} "
                f"(run folder {self.root.parent}); it stays hidden as {write.partial.name}. Another rank may have "
                "died or the disk may be stalled: see the other ranks' logs. The run resumes from the newest "
                "complete checkpoint; Checkpointer(timeout_s=...) allows slower saves."
            )
        self._pending = None
        if write.error is not None:
            raise RuntimeError(
                f"checkpoint step {write.step} failed on rank {self.rank} (run folder {self.root.parent}): "
                f"{type(write.error).__name__}: {write.error}"
            ) from write.error

    def close(self, *, raise_error: bool = True, timeout_s: float | None = None) -> None:
        """Wait for the pending save (as `wait`, same ``timeout_s``), then destroy this Checkpointer's gloo group.

        Call it on every rank before ``dist.destroy_process_group()``, which would otherwise pull the group from under
        a background writer. With ``raise_error=False`` (cleaning up after another error) a failed or timed-out save
        is logged instead of raised. Idempotent; `save` and `load` refuse to run afterwards."""
        if self._closed:
            return
        try:
            self.wait(timeout_s)
        except Exception as error:
            if raise_error:
                raise
            logger.error("checkpoint not completed while closing (rank %d): %s", self.rank, error)
        finally:
            self._closed = True
            # A writer still running (timed out) keeps using the group until its collectives time out: leave the
            # group to destroy_process_group then; the daemon thread does not keep the process alive.
            if self._group is not None and self._pending is None and dist.is_initialized():
                dist.destroy_process_group(self._group)
                self._group = None

    def load(
        self, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> tuple[dict, dict]:
        """Restore checkpoint ``step`` into model, optimizer, scheduler and this rank's RNGs.

        Returns (loader_state, extra) of this rank for the caller to apply to its loader."""
        self._require_open("load")
        folder = self.root / step_dir_name(step)
        rank_path = folder / _rank_file(self.rank)
        if not (folder / ".metadata").is_file():
            raise ValueError(f"no complete checkpoint at {folder}; complete steps: {self._complete_steps()}")
        if not rank_path.is_file():
            raise ValueError(
                f"checkpoint {folder} has no state for rank {self.rank}: it was written by fewer ranks. "
                "Resume with the number of processes that wrote it, or start a new run folder."
            )
        saved = torch.load(rank_path, map_location="cpu", weights_only=True)
        if saved["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {folder} was written by {saved['world_size']} ranks, this run has {self.world_size}: "
                "the loader positions and RNG streams would not continue exactly. Resume with "
                f"{saved['world_size']} processes, or start a new run folder."
            )
        state = _train_state(model, optimizer)
        dcp.load(state, checkpoint_id=str(folder), **self._dcp_kwargs())
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=False),  # frozen base weights are not in the checkpoint by design
        )
        if scheduler is not None:
            if saved["scheduler"] is None:
                raise ValueError(f"checkpoint {folder} holds no scheduler state, but a scheduler was given")
            scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
        logger.info("resumed from %s", folder)
        return saved["loader"], saved["extra"]

    # ------------------------------------------------------------------ internals

    def _dcp_kwargs(self) -> dict[str, Any]:
        return {"process_group": self._group} if self._distributed else {"no_dist": True}

    def _require_open(self, action: str) -> None:
        if self._closed:
            raise RuntimeError(f"cannot {action} a checkpoint of {self.root.parent}: this Checkpointer was closed")

    def _write(self, staged: dict[str, Any], write: _Write) -> None:
        """Body of the writer thread: the outcome goes to ``write`` for `wait`, whatever happens (exactly once)."""
        try:
            dcp.save(staged, checkpoint_id=str(write.partial), **self._dcp_kwargs())
            if self._distributed and not dist.is_initialized():
                # DCP saves as a lone process when it finds no process group: each rank's file would be the whole
                # checkpoint. Never make such a save visible.
                raise RuntimeError(
                    "the process group was destroyed while the checkpoint was being written; call "
                    "Checkpointer.close() before torch.distributed.destroy_process_group()"
                )
            self._finalize(write.step, write.partial, write.started)
        except BaseException as error:
            write.error = error
            logger.error("checkpoint step %d failed on rank %d: %s", write.step, self.rank, error)
        finally:
            write.done.set()

    def _finalize(self, step: int, partial: Path, started: float) -> None:
        """Rank 0 makes the checkpoint visible (every rank's data is on disk once DCP's save returns on the
        coordinator) and prunes older ones only after that."""
        if self.rank != 0:
            return
        final = self.root / step_dir_name(step)
        stale = self.root / f".{step_dir_name(step)}.replaced-{self._token}"
        if final.exists():  # the same step saved again (a resumed run): out of sight first, deleted after
            os.replace(final, stale)
        os.replace(partial, final)
        if stale.exists():
            shutil.rmtree(stale)
        logger.info("checkpoint step %d complete in %.2f s: %s", step, _since(started), final)
        for old in self._complete_steps()[: -self.keep]:
            removing = self.root / f".{step_dir_name(old)}.removing-{self._token}"
            os.replace(self.root / step_dir_name(old), removing)  # out of sight first: never half deleted
            shutil.rmtree(removing)
            logger.info("removed old checkpoint step %d", old)

    def _complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for entry in self.root.iterdir():
            match = _COMPLETE.match(entry.name)
            if match and (entry / ".metadata").is_file():
                steps.append(int(match[1]))
        return sorted(steps)

    def _remove_partials(self) -> None:
        for entry in self.root.iterdir():
            if entry.name.startswith(".step-") and entry.is_dir():
                logger.info("removing an unfinished checkpoint of an earlier attempt: %s", entry)
                shutil.rmtree(entry)

    def _shared_token(self) -> str:
        """One random name part for this attempt's partial folders, the same on every rank."""
        token = [uuid.uuid4().hex[:12]]
        if self._distributed:
            dist.broadcast_object_list(token, src=0, group=self._group)
        return token[0]

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self._group)


# ---------------------------------------------------------------------- state


def _train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{'model', 'optim'} as DCP wants them; only trainable tensors when part of the model is frozen."""
    frozen = {_clean_name(n) for n, p in model.named_parameters() if not p.requires_grad}
    options = StateDictOptions(ignore_frozen_params=bool(frozen))
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if frozen:  # also drop tensors hanging off frozen weights (4-bit quantisation state: 'w.absmax', ...)
        model_state = {k: v for k, v in model_state.items() if not any(k.startswith(f + ".") for f in frozen)}
        trainable = {_clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
        assert trainable <= model_state.keys(), f"trainable weights missing: {sorted(trainable - model_state.keys())}"
    return {"model": model_state, "optim": optim_state}


def _stage(state: dict[str, Any]) -> dict[str, Any]:
    """A CPU copy of ``state`` that the writer thread can use while training goes on (what async_save stages)."""
    options = StagingOptions(
        use_pinned_memory=False, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
    )
    stager = DefaultStager(options)
    try:
        return stager.stage(state)
    finally:
        stager.close()  # drops its cache only; the copy stays valid


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _save_rank_file(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda file: torch.save(data, file))


def _require_plain(value: Any, where: str) -> None:
    """Per-rank state is loaded with weights_only=True: plain containers, numbers, strings and tensors only."""
    if isinstance(value, dict):
        for key, item in value.items():
            _require_plain(key, f"{where} key")
            _require_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _require_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN):
        raise ValueError(
            f"{where} holds a {type(value).__name__}; checkpoints keep dicts, lists, numbers, strings and tensors only"
        )


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's current device
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise ValueError("the checkpoint holds a CUDA RNG state but CUDA is not available; resume on a GPU")
        torch.cuda.set_rng_state(state["cuda"])


def _since(started: float) -> float:
    return time.perf_counter() - started
