"""The resolution-dependent σ shift (a small hook the objective's samplers can share).

Rule (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3), §5.3.2,
"resolution-dependent shifting of timestep schedules"): more pixels carry more signal at a given noise level, so a
schedule tuned for n pixels is moved, for m pixels, by α = sqrt(m / n): σ_m = α σ_n / (1 + (α − 1) σ_n). That map
is ComfyUI's time shift (``objective.shift_sigma``), and two shifts compose by multiplying (shift a then b is shift
a·b), so a run whose shift is ``shift`` at ``reference`` px trains an r px square bucket at

    shift(r) = shift · sqrt(r² / reference²) = shift · r / reference

(Z-Image's 3.0 at 1024 px gives 1.5 at 512 px). Non-square buckets of one pack resolution share its area, hence
its shift.
"""

from __future__ import annotations

import math

SHIFT_RULES = ("constant", "sqrt_area")


def resolution_shift(shift: float, resolution: int, *, reference: int = 1024, rule: str = "sqrt_area") -> float:
    """The σ shift for square-equivalent ``resolution`` px, given ``shift`` at ``reference`` px (see the module)."""
    if rule not in SHIFT_RULES:
        raise ValueError(f"shift rule {rule!r} must be one of {SHIFT_RULES}")
    if not shift > 0 or resolution <= 0 or reference <= 0:
        raise ValueError(f"shift {shift!r}, resolution {resolution!r} and reference {reference!r} must be positive")
    if rule == "constant":
        return shift
    return shift * math.sqrt(resolution * resolution / (reference * reference))
