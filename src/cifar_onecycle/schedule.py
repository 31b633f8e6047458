"""The One Cycle learning-rate schedule as knots and a pure function of the step.

Steps count from 0 and the LR is set before every batch. With the seed's values and
S steps per epoch the knots are::

    step 0          LRMIN  (1e-4)
    step 5*S - 1    LRMAX  (0.2)   the last batch of epoch 5
    step 24*S - 1   LRMIN  (1e-4)  the last batch of epoch 24: no annihilation below LRMIN

with straight lines between them. This is exactly ``torch.optim.lr_scheduler.OneCycleLR`` with
``max_lr=LRMAX, total_steps=24*S, pct_start=5/24, div_factor=LRMAX/LRMIN, final_div_factor=1,
anneal_strategy="linear", three_phase=False, cycle_momentum=False`` (a test checks every step).

The momentum may cycle too, as Smith's One Cycle policy has it ("A disciplined approach to neural
network hyper-parameters", 2018: 0.95 down to 0.85 while the LR rises, back while it falls; fastai's
default): the same knots, with the recipe's ``momentum`` where the LR is at LRMIN and
``momentum_at_peak`` at LRMAX; ``OneCycleLR`` with ``cycle_momentum=True`` and those two as
``max_momentum`` and ``base_momentum`` (tested too). The seed's recipe keeps it constant.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass


def one_cycle_knots(epochs: int, steps_per_epoch: int, peak_epoch: float,
                    lr_min: float, lr_max: float) -> list[tuple[int, float]]:
    """The (step, lr) corners of the schedule: start, peak, end."""
    total = epochs * steps_per_epoch
    peak = min(max(round(peak_epoch * steps_per_epoch) - 1, 0), total - 1)
    knots = [(0, lr_min), (peak, lr_max), (total - 1, lr_min)]
    # A peak on the first or the last step collapses a phase; keep the knots strictly increasing.
    return [k for i, k in enumerate(knots) if i == 0 or k[0] > knots[i - 1][0]]


def lr_at(step: int, knots: list[tuple[int, float]]) -> float:
    """Linear interpolation between the knots; constant outside them."""
    steps = [s for s, _ in knots]
    i = bisect_right(steps, step)
    if i == 0:
        return knots[0][1]
    if i == len(knots):
        return knots[-1][1]
    (s0, v0), (s1, v1) = knots[i - 1], knots[i]
    return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


@dataclass(frozen=True)
class OneCycle:
    """A run's schedule: the LR's knots and, when the momentum cycles, the momentum's."""

    lr_knots: list[tuple[int, float]]
    momentum_knots: list[tuple[int, float]] | None = None

    def lr(self, step: int) -> float:
        return lr_at(step, self.lr_knots)

    def momentum(self, step: int) -> float | None:
        """SGD's momentum for ``step`` (the same straight lines between knots as the LR); None when it
        does not cycle: the optimizer keeps the recipe's."""
        return None if self.momentum_knots is None else lr_at(step, self.momentum_knots)
