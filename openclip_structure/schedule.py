"""Training progress and loss-weight schedules.

The launcher wraps open_clip's LR-scheduler factories so that every ``scheduler(step)`` call
also records the global step and the total number of optimizer steps in a
:class:`TrainingProgress`. Weight schedules read the fraction of training done from it, so they
follow ``--resume`` for free (open_clip recomputes ``step`` from the epoch on resume).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple


class TrainingProgress:
    """Global optimizer step and total steps of the running training job."""

    def __init__(self) -> None:
        self.step = 0
        self.total_steps: Optional[int] = None

    @property
    def fraction(self) -> float:
        if not self.total_steps:
            return 0.0
        return min(max(self.step / self.total_steps, 0.0), 1.0)

    def reset(self) -> None:
        self.step, self.total_steps = 0, None


#: the progress of the training run in this process (updated by the launcher's LR-scheduler hook)
PROGRESS = TrainingProgress()


class PiecewiseLinear:
    """``weight * f(fraction)`` with ``f`` linear between ``(fraction, factor)`` knots."""

    def __init__(self, weight: float, knots: Sequence[Tuple[float, float]]):
        self.weight = float(weight)
        self.knots = [(float(x), float(y)) for x, y in knots]

    def __call__(self, fraction: float) -> float:
        x0, y0 = self.knots[0]
        if fraction <= x0:
            return self.weight * y0
        for x1, y1 in self.knots[1:]:
            if fraction <= x1:
                return self.weight * (y0 + (y1 - y0) * (fraction - x0) / (x1 - x0))
            x0, y0 = x1, y1
        return self.weight * y0

    def __repr__(self) -> str:
        return f"PiecewiseLinear(weight={self.weight}, knots={self.knots})"


def constant(weight: float) -> PiecewiseLinear:
    return PiecewiseLinear(weight, [(0.0, 1.0)])


# Grassucci et al. (ICLR 2026), authors' default run, in fractions of total steps:
# lambda_cu = 1 until 20%, linear 1 -> 0 by 70%, then 0; lambda_atp = 1 until 50%, linear 1 -> 2 by 100%.
GAP_RAMP_KNOTS = {
    "gap_atp": [(0.0, 1.0), (0.5, 1.0), (1.0, 2.0)],
    "gap_cu": [(0.0, 1.0), (0.2, 1.0), (0.7, 0.0), (1.0, 0.0)],
}
