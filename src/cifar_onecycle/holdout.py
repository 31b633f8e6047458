"""The validation split: ``holdout`` training images left out of training and evaluated each epoch
in place of the test set, so that settings are chosen without looking at the test images.

The held-out images are drawn from the whole training set, before ``train_subset`` takes the first
images of what remains, by a generator of its own (``HOLDOUT_SEED``), never the recipe's seed: every
seed and every point of a sweep sees the same validation images. The split is stratified: each class
gives its share of the N images (by largest remainder, ties to the lower class), so that a small
split has every class in the proportion the training set has it. Each class's images are the first
of one fixed order, so with classes of equal size a smaller holdout's images are among a larger's;
with unequal ones largest remainder may move a class's last image to another as N grows by one
(97 of 1,482 such steps on a made-up set of 3,000 images in 10 unequal classes).
"""
from __future__ import annotations

import torch

from .errors import UserError, as_setting

# Not the recipe's seed: the validation images must not change with it.
HOLDOUT_SEED = 0


def holdout_split(labels: torch.Tensor, holdout: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training indices, held-out indices) of a training set with these ``labels``, both ascending.
    ``holdout`` images, stratified by class, chosen by ``HOLDOUT_SEED`` alone."""
    labels = labels.cpu()
    n = len(labels)
    if not classes <= holdout < n:
        raise UserError(f"{as_setting('holdout')} {holdout}: give at least one image a class ({classes}) and fewer "
                        f"than the "
                        f"{n} training images")
    counts = torch.bincount(labels, minlength=classes)[:classes].tolist()
    quotas = [holdout * c / n for c in counts]
    taken = [int(q) for q in quotas]
    by_remainder = sorted(range(classes), key=lambda c: (taken[c] - quotas[c], c))  # largest remainder first
    for c in by_remainder[:holdout - sum(taken)]:
        taken[c] += 1
    empty = [c for c in range(classes) if taken[c] == 0]
    if empty:
        raise UserError(f"{as_setting('holdout')} {holdout} leaves class {empty[0]} no validation image "
                        f"({counts[empty[0]]} training "
                        f"images of it); hold out more")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    shuffled = labels[order]
    held = torch.cat([order[shuffled == c][:taken[c]] for c in range(classes)]).sort().values
    kept = torch.ones(n, dtype=torch.bool)
    kept[held] = False
    return kept.nonzero().squeeze(1), held
