"""The sources a recipe's ``dataset`` names, and what a run learns of its data.

``load_dataset`` reads CIFAR-10, CIFAR-100 (``data``) or a folder of images (``image_folder``) into
the same ``LabelledImages``. ``fit_recipe`` fills in the recipe's data settings from the data when
the recipe leaves them to it: the classes' names, and the per-channel mean and standard deviation
that inputs are standardised with (CIFAR-10's constants for CIFAR-10, as the seed; the training
images' own for any other source), so that evaluate, report and predict need no data to use them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import SOURCES, LabelledImages, download_bar, load_source
from .errors import DatasetError, as_setting
from .recipe import CIFAR10_MEAN, CIFAR10_STD, Recipe, as_recipe


def load_dataset(recipe: Recipe | str | Path | None = None, data_dir: str | Path = "data", download: bool = True,
                 progress: bool = False, split: str = "both") -> LabelledImages:
    """The images of ``recipe.dataset`` (a Recipe, a shipped recipe's name or a TOML file's path;
    None: the seed's) from ``data_dir``: the official archive's folder (extracted or downloaded
    when needed, with a progress bar when ``progress``), or a folder of train/<class>/ and
    test/<class>/ images."""
    recipe = as_recipe(recipe)
    if recipe.dataset == "folder":
        from .image_folder import load_folder

        return load_folder(data_dir, split, recipe.skip_bad_images)
    source = SOURCES[recipe.dataset]
    bar = download_bar(f"download {source.name}") if progress else None
    return load_source(source, data_dir, download, bar, split)


def check_classes(recipe: Recipe, data: LabelledImages, where: str) -> None:
    """Refuse data whose classes are not the recipe's (same names, same order)."""
    if recipe.class_names != data.classes:
        theirs, ours = data.classes, recipe.class_names
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), min(len(theirs),
                                                                                                   len(ours)))
        raise DatasetError(f"{where}: its {len(theirs)} classes are not the model's {len(ours)} (label {first}: "
                           f"{theirs[first] if first < len(theirs) else 'none'} here, "
                           f"{ours[first] if first < len(ours) else 'none'} in the model); give the "
                           f"{as_setting('dataset')} the model was trained on, or data with its classes")


def fit_recipe(recipe: Recipe, data: LabelledImages, train_images: torch.Tensor) -> Recipe:
    """``recipe`` with its data settings filled in from ``data`` where it leaves them to the data
    (None), and refused where it names other classes. ``train_images``: the images the run trains
    on (the holdout left out), whose statistics a source other than CIFAR-10 is standardised with."""
    if recipe.classes is not None:
        check_classes(recipe, data, f"{as_setting('dataset')} {recipe.dataset}")
    if recipe.mean is not None and recipe.std is not None:
        mean, std = recipe.mean, recipe.std
    elif recipe.dataset == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean, std = channel_stats(train_images)
    return recipe.replace(classes=data.classes, mean=mean, std=std)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, float, float],
                                                                   tuple[float, float, float]]:
    """Per-channel mean and standard deviation of uint8 NCHW ``images``, on 0..1, rounded to 4
    places as CIFAR-10's constants are: sums in float64, a chunk of images at a time (the whole set
    in float64 would be 1.2 GB for 50,000 images)."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    n = max(len(images), 1) * images.shape[2] * images.shape[3]
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(1e-12).sqrt()
    r, g, b = (round(float(v), 4) for v in mean)
    # a channel of one value has no spread; 1e-4 keeps the standardisation finite
    sr, sg, sb = (max(round(float(v), 4), 1e-4) for v in std)
    return (r, g, b), (sr, sg, sb)
