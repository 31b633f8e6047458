"""Batched augmentation on the training device, in the seed's order: RandomCrop, FlipLR, CutOut.

Every sample gets its own crop offset, flip and hole. An epoch's draws are made once, at its
start, for every position of its order (``draw_augmentation``): the images a step sees depend on
the seed and the position alone, not on how many batches are augmented together, so the device
can augment one batch at a time (the CPU, no extra memory) or many at once (a GPU, where each
batch's dozen small kernels cost more in launches than in work). Everything is whole-batch tensor
indexing: no per-image Python loop, no DataLoader workers.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .recipe import CIFAR10_MEAN, CIFAR10_STD, Normalization

# Per-channel mean and std of the 50,000 original CIFAR-10 training images (0-1 scale; the
# recipe's constants). Fixed rather than statistics of whatever copy is loaded, so a weights file
# evaluates the same on any copy of the data set; other sources' are computed once and recorded in
# the recipe. The CutOut fill (the mean) is exactly 0 after normalisation.
CIFAR10_NORMALIZATION: Normalization = (CIFAR10_MEAN, CIFAR10_STD)
# The columns of an augmentation draw: the crop's offset (dy, dx), the flip (0 or 1), the hole's
# corner (y, x).
DRAW_COLUMNS = ("crop_dy", "crop_dx", "flip", "hole_y", "hole_x")


def pad_reflect(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Reflect-pad uint8 NCHW images by ``padding`` on each side (done once per run, not per batch)."""
    if padding == 0:
        return images
    # reflect padding has no integer kernel on every device; the float round trip is exact for uint8.
    return F.pad(images.float(), (padding,) * 4, mode="reflect").to(torch.uint8)


def draw_augmentation(count: int, *, size: int, padding: int, cutout_size: int, generator: torch.Generator,
                      ) -> torch.Tensor:
    """``count`` samples' draws as an int64 [count, 5] tensor (``DRAW_COLUMNS``), on the generator's
    device: crop offsets uniform in 0..2*padding, a flip with probability 1/2, a hole corner that
    keeps the ``cutout_size`` square wholly inside the ``size`` x ``size`` image (as in cifar10-fast).
    Made whether or not the recipe uses each transform, so that switching one off leaves the
    others' draws as they were."""
    device = generator.device
    crop_dy = torch.randint(0, 2 * padding + 1, (count,), generator=generator, device=device)
    crop_dx = torch.randint(0, 2 * padding + 1, (count,), generator=generator, device=device)
    flip = (torch.rand(count, generator=generator, device=device) < 0.5).long()
    hole_y = torch.randint(0, size - cutout_size + 1, (count,), generator=generator, device=device)
    hole_x = torch.randint(0, size - cutout_size + 1, (count,), generator=generator, device=device)
    return torch.stack([crop_dy, crop_dx, flip, hole_y, hole_x], 1)


def draws_problem(draws: torch.Tensor, count: int, *, size: int, padding: int, cutout_size: int) -> str | None:
    """What is wrong with ``draws`` as ``draw_augmentation`` would make them for ``count`` samples
    (read back from a checkpoint, where an index out of range would crash a gather); None if nothing."""
    if draws.dtype != torch.int64 or tuple(draws.shape) != (count, len(DRAW_COLUMNS)):
        return f"augmentation draws of {draws.dtype} {tuple(draws.shape)}, not int64 ({count}, {len(DRAW_COLUMNS)})"
    highs = (2 * padding, 2 * padding, 1, size - cutout_size, size - cutout_size)
    for column, (name, high) in enumerate(zip(DRAW_COLUMNS, highs, strict=True)):
        values = draws[:, column]
        if count and (int(values.min()) < 0 or int(values.max()) > high):
            return f"augmentation draw {name} outside 0..{high}"
    return None


def crop_at(padded: torch.Tensor, size: int, offsets: torch.Tensor) -> torch.Tensor:
    """The ``size`` x ``size`` window of each image at its offset (``offsets[N, 2]`` as (dy, dx))."""
    n, c = padded.shape[:2]
    dev = padded.device
    window = torch.arange(size, device=dev)
    rows = (offsets[:, 0:1] + window)[:, None, :, None]            # N,1,size,1
    cols = (offsets[:, 1:2] + window)[:, None, None, :]            # N,1,1,size
    return padded[torch.arange(n, device=dev)[:, None, None, None],
                  torch.arange(c, device=dev)[None, :, None, None], rows, cols]


def flip_where(images: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right where ``flipped[N]`` is true."""
    return torch.where(flipped.bool()[:, None, None, None], images.flip(-1), images)


def cutout_at(images: torch.Tensor, size: int, corners: torch.Tensor) -> torch.Tensor:
    """One ``size`` x ``size`` square of each normalised image set to 0 (the dataset mean), at its
    corner (``corners[N, 2]`` as (y, x))."""
    _, _, h, w = images.shape
    dev = images.device
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    y0, x0 = corners[:, 0, None, None], corners[:, 1, None, None]
    hole = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)   # N,H,W
    return images.masked_fill(hole[:, None], 0.0)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32,
              normalization: Normalization = CIFAR10_NORMALIZATION) -> torch.Tensor:
    """uint8 NCHW (0-255) to float, standardised per channel by ``normalization`` ((mean, std) on
    0..1: a recipe's ``normalization``; default CIFAR-10's, the seed's)."""
    mean = torch.tensor(normalization[0], device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(normalization[1], device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (images.to(dtype) - mean) / std


def apply_augmentation(padded: torch.Tensor, draws: torch.Tensor, *, crop: bool, padding: int, flip: bool,
                       cutout_size: int, normalization: Normalization = CIFAR10_NORMALIZATION) -> torch.Tensor:
    """Crop (from images pre-padded by ``padding``), flip, normalise, CutOut (0 = off), each image
    by its row of ``draws`` (``draw_augmentation``): a float batch."""
    x = crop_at(padded, padded.shape[-1] - 2 * padding, draws[:, 0:2]) if crop else padded
    if flip:
        x = flip_where(x, draws[:, 2])
    x = normalize(x, normalization=normalization)
    if cutout_size:
        x = cutout_at(x, cutout_size, draws[:, 3:5])
    return x


def augment_batch(padded: torch.Tensor, *, crop: bool, padding: int, flip: bool, cutout_size: int,
                  generator: torch.Generator, normalization: Normalization = CIFAR10_NORMALIZATION) -> torch.Tensor:
    """``padded`` augmented with fresh draws from ``generator``: a float batch."""
    draws = draw_augmentation(len(padded), size=padded.shape[-1] - 2 * padding, padding=padding,
                              cutout_size=cutout_size, generator=generator)
    return apply_augmentation(padded, draws, crop=crop, padding=padding, flip=flip, cutout_size=cutout_size,
                              normalization=normalization)


def epoch_batches(padded: torch.Tensor, labels: torch.Tensor, batch_size: int, *, crop: bool, padding: int,
                  flip: bool, cutout_size: int, order: torch.Tensor, draws: torch.Tensor, start: int = 0,
                  rank: int = 0, world: int = 1, memory_format: torch.memory_format = torch.channels_last,
                  batches_at_once: int = 1, normalization: Normalization = CIFAR10_NORMALIZATION,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Augmented (images, labels) batches of device-resident data, in ``order``, from batch ``start``;
    the image at position ``p`` of the order is augmented by ``draws[p]``.

    Only full batches: the remainder of the shuffled order (a different one each epoch) is dropped,
    so every step has the same batch size for BatchNorm and the per-step schedule. The batches are
    the same whatever ``start`` and ``batches_at_once`` (how many are augmented together: memory
    against kernel launches). With ``world`` processes, ``batch_size`` is the global batch and this
    rank yields its contiguous share of each one: together the ranks cover every batch exactly once.
    """
    per = batch_size // world
    steps = len(order) // batch_size
    for first in range(start, steps, batches_at_once):
        batches = range(first, min(first + batches_at_once, steps))
        # this rank's positions in each batch of the group, in order
        positions = (torch.arange(batches.start, batches.stop, device=order.device)[:, None] * batch_size
                     + rank * per + torch.arange(per, device=order.device)).flatten()
        images = apply_augmentation(padded[order[positions]], draws[positions], crop=crop, padding=padding,
                                    flip=flip, cutout_size=cutout_size, normalization=normalization,
                                    ).contiguous(memory_format=memory_format)
        group_labels = labels[order[positions]]
        for k in range(len(batches)):  # views along N: no copy, and a channels_last slice stays channels_last
            yield images[k * per:(k + 1) * per], group_labels[k * per:(k + 1) * per]
