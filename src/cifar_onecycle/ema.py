"""An exponential moving average (EMA) of a model's weights and BatchNorm statistics.

The average is a second copy of the model that trails the trained one: every ``every`` steps each
floating-point tensor moves ``1 - decay**every`` of the way towards the trained value, so ``decay``
is a per-step rate whatever ``every`` is. Averaging the weights of the last few hundred steps
smooths out the noise of the final SGD steps (David Page's "bag of tricks" for this network family
averages every 5 batches; hlb-CIFAR10 uses 0.99 per step). The averaged copy is what a run
evaluates and saves in place of the trained weights.

Early on the decay is held at ``(1 + n) / (10 + n)`` after ``n`` updates when that is lower (as
timm's ModelEmaV2 warms up), so a short run's average is not dominated by its initial weights.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch


class WeightEMA:
    """A trailing average of ``model`` (its parameters and float buffers; integer buffers such as
    BatchNorm's batch counter are copied)."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 5) -> None:
        if not 0 < decay < 1 or every < 1:
            raise ValueError(f"WeightEMA: need 0 < decay < 1 and every >= 1, got {decay}, {every}")
        self.decay, self.every = decay, every
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def rate(self, step: int) -> float:
        """The weight the old average keeps in an update after global ``step``: ``decay`` to the
        power of the steps since the last update, or less during the warm-up."""
        since = step % self.every or self.every
        n = -(-step // self.every)  # updates so far, this one included
        return min(self.decay ** since, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, final: bool = False) -> bool:
        """Call after each optimizer step with the number of steps taken so far; ``final`` on the
        run's last step, which always updates so that the average holds the last weights' share.
        Acts on every ``every``-th step only; costs one pass over the weights (26 MB here) then."""
        if step % self.every and not final:
            return False
        keep = self.rate(step)
        avg, new = self.model.state_dict(), model.state_dict()
        floats = [k for k, v in avg.items() if v.is_floating_point()]
        torch._foreach_lerp_([avg[k] for k in floats], [new[k].detach() for k in floats], 1.0 - keep)
        for k, v in avg.items():
            if not v.is_floating_point():
                v.copy_(new[k])
        return True


@torch.no_grad()
def refresh_batchnorm(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace ``model``'s BatchNorm running statistics with their plain average over ``batches``
    (as SWA's ``update_bn``): an average of weights is not the weights whose statistics the average
    of statistics describes. One forward pass a batch, in training mode, nothing else changed."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    was_training = model.training
    model.train()
    try:
        for inputs, _ in batches:
            model(inputs)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
