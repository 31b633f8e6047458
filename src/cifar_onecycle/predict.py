"""Classify image files of any size, or the images in folders, with a trained model (each read as
``images.load_image`` reads it)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .augment import CIFAR10_NORMALIZATION, Normalization
from .errors import UserError, one_line
from .images import load_images
from .recipe import CIFAR10_CLASSES

# Grad-CAM pictures of predictions draw at most this many images (8 rows of 4).
GRADCAM_IMAGES = 32


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] | None = None   # (class, probability), best first
    error: str | None = None
    image: torch.Tensor | None = None  # uint8 3x32x32, as the model saw it (3 KB)


def image_paths(paths: Sequence[str | Path]) -> list[str]:
    """``paths`` with each folder replaced by the image files below it (``image_folder.image_files``:
    sorted, sub-folders included), at most ``MAX_FOLDER_IMAGES`` a folder; a folder without images is
    a UserError. Anything else stays as given, for ``predict_files`` to read or refuse."""
    from .image_folder import MAX_FOLDER_IMAGES, image_files

    out: list[str] = []
    for path in paths:
        if not Path(path).is_dir():
            out.append(str(path))
            continue
        found = image_files(Path(path), MAX_FOLDER_IMAGES)
        if not found:
            raise UserError(f"{path}: " + ("no images (PNG, JPEG, WebP, BMP or GIF) in it" if found is not None else
                                           f"more than {MAX_FOLDER_IMAGES:,} images; give fewer at a time"))
        out += [str(p) for p in found]
    return out


def predict_files(model: torch.nn.Module, paths: Sequence[str | Path], classes: Sequence[str] = CIFAR10_CLASSES,
                  normalization: Normalization = CIFAR10_NORMALIZATION, top_k: int = 3,
                  batch_size: int = 256) -> Iterator[Prediction]:
    """Top-k ``classes`` (the model's recipe's ``class_names``, with its ``normalization``) for each
    file, in order; a file that fails gets its error and the others are still done. Read
    ``batch_size`` at a time (``images.load_images``: on the process's cores, each image 3 KB once at
    32x32) and predicted together, each batch's predictions given as they are made: memory stays
    that of one batch, however many files. Outputs that are not finite (damaged weights) are an
    error for that file, not a class at "nan%"."""
    for start in range(0, len(paths), batch_size):
        yield from _predict_batch(model, paths[start:start + batch_size], classes, normalization, top_k)


def _predict_batch(model: torch.nn.Module, paths: Sequence[str | Path], classes: Sequence[str],
                   normalization: Normalization, top_k: int) -> list[Prediction]:
    from .report import predict_probabilities

    out: list[Prediction] = []
    images: list[tuple[int, torch.Tensor]] = []
    for p, image in zip(paths, load_images(paths), strict=True):
        if isinstance(image, UserError):
            out.append(Prediction(str(p), error=str(image)))
        else:
            images.append((len(out), image))
            out.append(Prediction(str(p), image=image))
    if not images:
        return out
    probabilities = predict_probabilities(model, torch.stack([image for _, image in images]),
                                          normalization=normalization)
    for (i, _), probs in zip(images, probabilities, strict=True):
        if not torch.isfinite(probs).all():
            out[i].error = f"{out[i].path}: the model's outputs are not finite numbers (damaged weights?)"
            continue
        values, idx = probs.topk(min(top_k, len(classes)))
        out[i].top = [(classes[k], v) for k, v in zip(idx.tolist(), values.tolist(), strict=True)]
    return out


def gradcam_figure(model: torch.nn.Module, predictions: Sequence[Prediction],
                   normalization: Normalization = CIFAR10_NORMALIZATION) -> Any:
    """The first ``GRADCAM_IMAGES`` of ``predictions`` that have a class, each as the model saw it
    (32x32) under its Grad-CAM for that class, captioned with its file's name (and its folder's: a
    class folder's images share names) and the class's probability (``report.gradcam_grid``); None
    when none has one."""
    from .report import drawn, gradcam_grid

    shown = [(p.path, p.top[0], p.image) for p in predictions if p.top and p.image is not None][:GRADCAM_IMAGES]
    if not shown:
        return None
    titles = [f"{drawn(_short(one_line('/'.join(Path(path).parts[-2:]))))}\n{drawn(name)} {probability:.0%}"
              for path, (name, probability), _ in shown]
    return gradcam_grid(model, torch.stack([image for *_, image in shown]), titles, normalization)


def _short(text: str, width: int = 22) -> str:
    """``text`` cut to ``width`` characters from the left, where a path's file name is."""
    return text if len(text) <= width else "..." + text[-(width - 3):]
