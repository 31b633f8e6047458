"""Batched augmentation on the training device, in the seed's order: RandomCrop, FlipLR, CutOut.

Every sample gets its own crop offset, flip and hole, drawn from one ``torch.Generator`` so a run
is reproducible from its seed. Everything is whole-batch tensor indexing: no per-image Python loop,
no DataLoader workers.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

# Per-channel mean and std of the 50,000 original CIFAR-10 training images (0-1 scale). Fixed
# constants rather than statistics of whatever data is loaded, so a weights file evaluates the same
# on any copy of the data set, and the CutOut fill (the mean) is exactly 0 after normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def pad_reflect(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Reflect-pad uint8 NCHW images by ``padding`` on each side (done once per run, not per batch)."""
    if padding == 0:
        return images
    # reflect padding has no integer kernel on every device; the float round trip is exact for uint8.
    return F.pad(images.float(), (padding,) * 4, mode="reflect").to(torch.uint8)


def random_crop(padded: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``size`` x ``size`` window per image at a uniform offset; returns (crops, offsets[N, 2] as (dy, dx))."""
    n, c, h, w = padded.shape
    dev = padded.device
    offsets = torch.stack([torch.randint(0, h - size + 1, (n,), generator=generator, device=dev),
                           torch.randint(0, w - size + 1, (n,), generator=generator, device=dev)], 1)
    ar = torch.arange(size, device=dev)
    rows = (offsets[:, 0:1] + ar)[:, None, :, None]            # N,1,size,1
    cols = (offsets[:, 1:2] + ar)[:, None, None, :]            # N,1,1,size
    crops = padded[torch.arange(n, device=dev)[:, None, None, None],
                   torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    return crops, offsets


def random_flip(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each image left-right with probability 1/2; returns (images, flipped mask[N])."""
    flipped = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flipped[:, None, None, None], images.flip(-1), images), flipped


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero one ``size`` x ``size`` square per normalised image (0 is the dataset mean).

    The hole lies wholly inside the image (as in cifar10-fast), so every image loses exactly
    size*size pixels. Returns (images, corners[N, 2] as (y, x)).
    """
    n, _, h, w = images.shape
    dev = images.device
    corners = torch.stack([torch.randint(0, h - size + 1, (n,), generator=generator, device=dev),
                           torch.randint(0, w - size + 1, (n,), generator=generator, device=dev)], 1)
    ys = torch.arange(h, device=dev)[None, :, None]
    xs = torch.arange(w, device=dev)[None, None, :]
    y0, x0 = corners[:, 0, None, None], corners[:, 1, None, None]
    hole = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)   # N,H,W
    return images.masked_fill(hole[:, None], 0.0), corners


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW (0-255) to float, standardised per channel with the CIFAR-10 statistics."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR10_STD, device=images.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (images.to(dtype) - mean) / std


def augment_batch(padded: torch.Tensor, *, crop: bool, padding: int, flip: bool, cutout_size: int,
                  generator: torch.Generator) -> torch.Tensor:
    """Crop (from images pre-padded by ``padding``), flip, normalise, CutOut (0 = off): a float batch."""
    x = random_crop(padded, padded.shape[-1] - 2 * padding, generator)[0] if crop else padded
    if flip:
        x = random_flip(x, generator)[0]
    x = normalize(x)
    if cutout_size:
        x = cutout(x, cutout_size, generator)[0]
    return x


def epoch_batches(padded: torch.Tensor, labels: torch.Tensor, batch_size: int, *, crop: bool, padding: int,
                  flip: bool, cutout_size: int, generator: torch.Generator, order: torch.Tensor,
                  start: int = 0, rank: int = 0, world: int = 1,
                  memory_format: torch.memory_format = torch.channels_last,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Augmented (images, labels) batches of device-resident data, in ``order``, from batch ``start``.

    Only full batches: the remainder of the shuffled order (a different one each epoch) is dropped,
    so every step has the same batch size for BatchNorm and the per-step schedule. Resuming at
    ``start`` with the generator state saved after batch ``start - 1`` repeats the same draws.
    With ``world`` processes, ``batch_size`` is the global batch and this rank yields its
    contiguous share of each one: together the ranks cover every batch exactly once.
    """
    per = batch_size // world
    for i in range(start, len(order) // batch_size):
        idx = order[i * batch_size + rank * per:i * batch_size + (rank + 1) * per]
        x = augment_batch(padded[idx], crop=crop, padding=padding, flip=flip, cutout_size=cutout_size,
                          generator=generator)
        yield x.contiguous(memory_format=memory_format), labels[idx]
