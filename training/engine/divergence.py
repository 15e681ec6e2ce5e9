"""A step whose loss or gradient norm is not finite stops the run before it is logged or saved, saying what is kept."""

from __future__ import annotations

import math

from .background_writes import BackgroundWriteFailed, BackgroundWrites


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a step was not finite: the run stops before that step is saved."""


def check_finite(metrics: dict, *, step: int, saved_step: int | None, writes: BackgroundWrites) -> None:
    """Raise `TrainingDiverged` on a non-finite loss or gradient norm. Both are host floats already (reduced over
    ranks, so every rank stops at the same step): the check costs no device sync. Called before the result writes
    are checked, so that a diverged step's message tells of the last save's write."""
    loss, grad_norm = metrics["loss"], metrics["grad_norm"]
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    try:
        writes.wait()  # the last save's file is on disk before the message says it is kept
        kept = (
            f"the LoRA and checkpoint of step {saved_step} are kept as they were"
            if saved_step is not None
            else "nothing was saved yet"
        )
    except (BackgroundWriteFailed, TimeoutError) as error:
        kept = f"the LoRA of step {saved_step} was not written ({error}), its checkpoint is kept"
    raise TrainingDiverged(
        f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm} (learning rate "
        f"{metrics['lr']:.3g}); stopped without saving this step, {kept}. Lower optim.lr, keep optim.grad_clip "
        "above 0, or look for broken samples in the data"
    )
