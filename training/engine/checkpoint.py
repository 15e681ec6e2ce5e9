"""Resumable training state, saved asynchronously as plain JSON and safetensors (never a pickle).

Layout of ``<run>/checkpoints/``::

    step-000100/                 complete: visible only once every rank's files and the manifest are on disk
        checkpoint.json          written last, by rank 0: format, version, step, world size
        rank-00000.safetensors   per rank: trainable weights and optimizer state (its shards under FSDP2), torch RNG
        rank-00000.json          per rank: loader position, scheduler, extra, Python/NumPy RNG, optimizer values,
                                 tensor layout, SHA-256 of the tensor file (`checkpoint_files` has the details)
    .step-000200.<token>/        being written; renamed to step-000200 by rank 0 once every rank reported its files
    .step-000050.removing-<token>/  pruned: hidden first, then deleted (a kill in between leaves nothing visible)
    step-000300.damaged-<token>/ found damaged on resume and set aside once an older checkpoint was resumed instead

Hidden folders are what a kill leaves behind; rank 0 deletes them when the next attempt starts. Nothing read from a
run folder is unpickled (``torch.distributed.checkpoint`` is not used: it unpickles ``.metadata`` and loads non-tensor
values with ``torch.load(weights_only=False)``). `restore` resumes the newest checkpoint intact on every rank.

Only trainable parameters are saved when any parameter is frozen (LoRA, QLoRA): the base model is never copied.
Every rank must construct the Checkpointer and call `save`, `restore`, `load` and `close` at the same point (they are
collective when a process group is initialised); `latest_step` and `wait` are local.

An asynchronous save copies the state to CPU memory in the caller's thread, then writes it in a daemon thread of its
own (a writer stuck in a collective must not keep the process alive). The writer reports its outcome exactly once
(an Event set in a ``finally``); `wait` gives up after ``timeout_s`` with an error naming the step and run folder,
and the checkpoint's gloo group times out after the same time, so a dead peer cannot hold a writer forever. Call
`close` before destroying the process groups.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

from .checkpoint_files import (
    CheckpointDamaged,
    CheckpointMismatch,
    StagedRank,
    Target,
    stage_rank,
    train_state,
    write_manifest,
    write_rank,
)
from .checkpoint_folder import complete_steps, prune, publish, remove_partials, set_aside, step_dir_name
from .checkpoint_read import read_rank, refuse_pickled_folders

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
DEFAULT_TIMEOUT_S = 600.0  # the longest a checkpoint may take to write (and its collectives wait for other ranks)
_OK, _DAMAGED, _REFUSED = 0, 1, 2  # what a rank found in a checkpoint; the worst one over the ranks decides


@dataclass(eq=False)
class _Write:
    """One background save; ``done`` is set exactly once, when it succeeded (error None) or failed."""

    step: int
    partial: Path
    started: float
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` resumed: the step, and this rank's loader state and extra to apply."""

    step: int
    loader_state: dict
    extra: dict


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
        self._token = f"{self._broadcast([secrets.randbits(48)])[0]:012x}"  # this attempt's, the same on every rank
        self._pending: _Write | None = None
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_partials(self.root)
        self._barrier()

    # ------------------------------------------------------------------ public API

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None (not checked for damage: `restore` does that)."""
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
        ema: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write checkpoint ``step``. With ``async_save`` the tensors are copied to CPU now and written in the
        background; call `wait` or `close` before exiting. A previous pending save is waited for first.

        ``loader_state``, ``extra`` and the scheduler's state must be plain JSON (string keys)."""
        self._require_open("save")
        self.wait()
        started = time.perf_counter()
        staged = stage_rank(
            step=step,
            rank=self.rank,
            world_size=self.world_size,
            state=train_state(model, optimizer, ema),
            scheduler=scheduler,
            loader_state=loader_state,
            extra=extra,
            copy=async_save,  # training may change the weights as soon as this returns
        )
        partial = self.root / f".{step_dir_name(step)}.{self._token}"
        partial.mkdir(parents=True, exist_ok=True)
        if not async_save:
            self._write_and_finalize(staged, step, partial, started)
            return
        write = _Write(step=step, partial=partial, started=started)
        writer = threading.Thread(target=self._write, args=(staged, write), name=f"checkpoint-{step}", daemon=True)
        self._pending = write
        writer.start()
        logger.info("checkpoint step %d: staged in %.2f s, writing in the background", step, _since(started))

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
        is logged instead of raised. Idempotent; `save`, `restore` and `load` refuse to run afterwards."""
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

    def restore(
        self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ema: dict | None = None
    ) -> Restored | None:
        """Resume from the newest checkpoint that is intact on every rank; None when there is no checkpoint.

        A damaged newer checkpoint is logged and, once an older one was restored, set aside as
        ``step-N.damaged-<token>``. Raises `CheckpointDamaged` when every checkpoint is damaged (the run's progress
        is never thrown away silently), `CheckpointMismatch` when one does not fit this run, and ValueError for a
        folder in the pickle-based format of earlier versions, which is never read."""
        self._require_open("restore")
        steps = self._broadcast(self._complete_steps())
        refuse_pickled_folders(self.root, have_checkpoints=bool(steps))
        if not steps:
            return None
        target = Target.of(train_state(model, optimizer, ema))
        damaged: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                restored = self._load(step, target, model, optimizer, scheduler)
            except CheckpointDamaged as error:
                damaged.append((step, str(error)))
                logger.warning("checkpoint step %d cannot be resumed: %s", step, error)
                continue
            if damaged:
                self._set_aside(step, [s for s, _ in damaged])
            return restored
        reasons = "; ".join(f"step {step}: {reason}" for step, reason in damaged)
        raise CheckpointDamaged(
            f"no checkpoint in {self.root} can be resumed ({reasons}). To start this run over, move that folder "
            "away (or set run.resume=false); to keep the progress, restore the files from a backup."
        )

    def load(
        self, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ema=None
    ) -> tuple[dict, dict]:
        """Restore checkpoint ``step`` (no fallback) into model, optimizer, scheduler and this rank's RNGs.

        Returns (loader_state, extra) of this rank for the caller to apply to its loader."""
        self._require_open("load")
        if step not in self._complete_steps():
            raise ValueError(f"no complete checkpoint of step {step} in {self.root}: complete {self._complete_steps()}")
        restored = self._load(step, Target.of(train_state(model, optimizer, ema)), model, optimizer, scheduler)
        return restored.loader_state, restored.extra

    # ------------------------------------------------------------------ internals

    def _load(self, step: int, target: Target, model, optimizer, scheduler) -> Restored:
        """Read and check step ``step`` on every rank; apply it only when every rank found its part intact."""
        folder = self.root / step_dir_name(step)
        scheduler_state = scheduler.state_dict() if scheduler is not None else None
        error: Exception | None = None
        try:
            loaded = read_rank(
                folder, rank=self.rank, step=step, world_size=self.world_size, target=target,
                scheduler_state=scheduler_state,
            )  # fmt: skip
        except OSError as caught:  # a vanished or unreadable file: an older checkpoint may do
            error = CheckpointDamaged(f"{folder} could not be read: {caught}")
        except Exception as caught:  # reported to the other ranks first, raised below
            error = caught
        worst = self._worst(_OK if error is None else _DAMAGED if isinstance(error, CheckpointDamaged) else _REFUSED)
        if error is not None:
            raise error
        if worst == _DAMAGED:
            raise CheckpointDamaged(f"another rank found checkpoint {folder} damaged (see that rank's log)")
        if worst == _REFUSED:
            raise CheckpointMismatch(f"another rank could not resume checkpoint {folder} (see that rank's log)")
        target.apply_values(loaded.values)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=target.tree["model"],
            optim_state_dict=target.tree["optim"],
            options=StateDictOptions(strict=False),  # frozen base weights are not in the checkpoint by design
        )
        if scheduler is not None:
            scheduler.load_state_dict(loaded.scheduler)
        loaded.apply_rng()
        logger.info("resumed from %s", folder)
        return Restored(step=step, loader_state=loaded.loader_state, extra=loaded.extra)

    def _set_aside(self, resumed: int, damaged: list[int]) -> None:
        logger.warning(
            "resuming from checkpoint step %d: the newer checkpoint(s) %s are damaged and set aside as "
            "step-N.damaged-%s (kept for inspection, never resumed or pruned)",
            resumed,
            damaged,
            self._token,
        )
        if self.rank == 0:
            set_aside(self.root, damaged, self._token)

    def _require_open(self, action: str) -> None:
        if self._closed:
            raise RuntimeError(f"cannot {action} a checkpoint of {self.root.parent}: this Checkpointer was closed")

    def _write(self, staged: StagedRank, write: _Write) -> None:
        """Body of the writer thread: the outcome goes to ``write`` for `wait`, whatever happens (exactly once)."""
        try:
            self._write_and_finalize(staged, write.step, write.partial, write.started)
        except BaseException as error:
            write.error = error
            logger.error("checkpoint step %d failed on rank %d: %s", write.step, self.rank, error)
        finally:
            write.done.set()

    def _write_and_finalize(self, staged: StagedRank, step: int, partial: Path, started: float) -> None:
        """Every rank writes its files and reports to the others; rank 0 then writes the manifest and finalizes."""
        problem: Exception | None = None
        try:
            write_rank(partial, staged)
        except Exception as error:  # the other ranks hear of it first, then it is raised
            problem = error
        if self._distributed and not dist.is_initialized():
            raise RuntimeError(
                "the process group was destroyed while the checkpoint was being written; call "
                "Checkpointer.close() before torch.distributed.destroy_process_group()"
            ) from problem
        worst = self._worst(_OK if problem is None else _DAMAGED)
        if problem is not None:
            raise problem
        if worst != _OK:
            raise RuntimeError(f"another rank could not write checkpoint step {step} (see that rank's log)")
        if self.rank == 0:
            write_manifest(partial, step=step, world_size=self.world_size)
            self._finalize(step, partial, started)

    def _finalize(self, step: int, partial: Path, started: float) -> None:
        """Rank 0 makes the checkpoint visible, then prunes older ones."""
        final = publish(self.root, step, partial, self._token)
        logger.info("checkpoint step %d complete in %.2f s: %s", step, _since(started), final)
        prune(self.root, self.keep, self._token)

    def _complete_steps(self) -> list[int]:
        return complete_steps(self.root)

    def _broadcast(self, values: list[int]) -> list[int]:
        """Rank 0's list of integers, on every rank (plain tensors: nothing is pickled between ranks either)."""
        if not self._distributed:
            return values
        count = torch.tensor([len(values)], dtype=torch.int64)
        dist.broadcast(count, src=0, group=self._group)
        if count.item() == 0:
            return []
        data = torch.tensor(values if self.rank == 0 else [0] * int(count.item()), dtype=torch.int64)
        dist.broadcast(data, src=0, group=self._group)
        return data.tolist()

    def _worst(self, code: int) -> int:
        """The largest of every rank's ``code``."""
        if not self._distributed:
            return code
        value = torch.tensor([code], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return int(value.item())

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier(group=self._group)


def _since(started: float) -> float:
    return time.perf_counter() - started
