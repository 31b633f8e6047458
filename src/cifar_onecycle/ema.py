"""An exponential moving average (EMA) of a model's weights and BatchNorm statistics.

The average is a second copy of the model that trails the trained one: every ``every`` steps each
floating-point tensor moves ``1 - decay**every`` of the way towards the trained value, so ``decay``
is a per-step rate whatever ``every`` is. Averaging the weights of the last few hundred steps
smooths out the noise of the final SGD steps (David Page's "bag of tricks" for this network family
averages every 5 batches; hlb-CIFAR10 uses 0.99 per step). The averaged copy is what a run
evaluates and saves in place of the trained weights.

Early on the decay is held at ``(1 + n) / (10 + n)`` after ``n`` updates when that is lower (as
timm's ModelEmaV2 warms up), so a short run's average is not dominated by its initial weights.

Lookahead (hlb-CIFAR10, then airbench) is the same average written back: each update also sets the
trained weights and statistics to it, and the decay ramps up as the cube of the run's progress
(``decay**every * (step / steps)**3``, airbench's 0.95**5 at the end), so the average barely holds
the weights back while the LR is high. airbench's ablations (KellerJordan/cifar10-zoo) took it
from 13.5 to 12 epochs for 94%, and note that it helped there only together with a fast
BatchNorm momentum (0.6).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch


class WeightEMA:
    """A trailing average of ``model`` (its parameters and float buffers; integer buffers such as
    BatchNorm's batch counter are copied). ``lookahead``: the average is written back into the
    trained model at each update."""

    def __init__(self, model: torch.nn.Module, decay: float, every: int = 5, lookahead: bool = False) -> None:
        if not 0 < decay < 1 or every < 1:
            raise ValueError(f"WeightEMA: need 0 < decay < 1 and every >= 1, got {decay}, {every}")
        self.decay, self.every, self.lookahead = decay, every, lookahead
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def rate(self, step: int, steps: int) -> float:
        """The weight the old average keeps in an update after global ``step`` of a run of
        ``steps``: ``decay`` to the power of the steps since the last update, or less during the
        warm-up; with lookahead, times the cube of the run's progress instead of the warm-up."""
        since = step % self.every or self.every
        if self.lookahead:
            return self.decay ** since * (step / steps) ** 3
        n = -(-step // self.every)  # updates so far, this one included
        return min(self.decay ** since, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, steps: int) -> bool:
        """Call after each optimizer step with the number of steps taken so far and the run's; the
        run's last step always updates, so that the average holds the last weights' share.
        Acts on every ``every``-th step only; costs one pass over the weights (26 MB here) then,
        and with lookahead a second, the copy back."""
        if step % self.every and step != steps:
            return False
        keep = self.rate(step, steps)
        avg, new = self.model.state_dict(), model.state_dict()
        floats = [k for k, v in avg.items() if v.is_floating_point()]
        torch._foreach_lerp_([avg[k] for k in floats], [new[k].detach() for k in floats], 1.0 - keep)
        for k, v in avg.items():
            if not v.is_floating_point():
                v.copy_(new[k])
        if self.lookahead:  # state_dict's tensors share the model's storage: written in place
            for k in floats:
                new[k].copy_(avg[k])
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
