"""SIGTERM/SIGINT as a polite stop: finish the step, save, exit 0 with status 'stopped'.

The first signal only sets ``requested``; the loop checks `GracefulStop.should_stop` once per step, which ranks agree
on through a MAX all-reduce (a signal may reach one rank only, or ranks at different steps). A second signal restores
the handler that was there before and re-delivers itself, so an impatient user still gets the usual behaviour
(SIGINT: KeyboardInterrupt; SIGTERM: termination).

Under torchrun, the agent forwards its own SIGTERM to every worker and kills survivors 30 s later: a save must fit in
that window (async checkpoints: `Checkpointer.wait`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Context manager installing stop-request handlers in the main thread, restoring the previous ones on exit."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        if not signals:
            raise ValueError("GracefulStop needs at least one signal, e.g. (signal.SIGTERM, signal.SIGINT)")
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulStop must be entered in the main thread (Python delivers signals there only)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested = True
            self.signal_name = name
            logger.warning("%s received: stopping after this step (send it again to stop at once)", name)
            return
        logger.warning("%s received again: stopping at once, without saving", name)
        previous = self._previous.get(signal.Signals(signum), signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)  # default (or ignored) disposition, now reinstalled

    def request(self, reason: str = "requested") -> None:
        """Ask for a stop from code (e.g. a stop file the node wrote) as a signal would."""
        if not self.requested:
            self.requested = True
            self.signal_name = reason

    def should_stop(self, group: dist.ProcessGroup | None = None) -> bool:
        """True when any rank has a stop request. Every rank of ``group`` must call this at the same point."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        device = _collective_device(group)
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        agreed = bool(flag.item())
        if agreed and not self.requested:
            self.requested = True
            self.signal_name = "another rank"
        return agreed


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """CPU unless the group's only backend is NCCL ('cpu:gloo,cuda:nccl' takes CPU tensors through gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
