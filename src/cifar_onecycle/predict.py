"""Classify image files of any size with a trained model (each read as ``images.load_image`` reads it)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .augment import CIFAR10_NORMALIZATION, Normalization
from .errors import UserError
from .images import load_image
from .recipe import CIFAR10_CLASSES


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] | None = None   # (class, probability), best first
    error: str | None = None


def predict_files(model: torch.nn.Module, paths: list[str], classes: Sequence[str] = CIFAR10_CLASSES,
                  normalization: Normalization = CIFAR10_NORMALIZATION, top_k: int = 3,
                  batch_size: int = 256) -> list[Prediction]:
    """Top-k ``classes`` (the model's recipe's ``class_names``, with its ``normalization``) for each
    file; a file that fails gets its error and the others are still done. Decoded one at a time
    (each 3 KB once at 32x32), predicted ``batch_size`` at once. Outputs that are not finite
    (damaged weights) are an error for that file, not a class at "nan%"."""
    from .report import predict_probabilities

    out: list[Prediction] = []
    images: list[tuple[int, torch.Tensor]] = []
    for p in paths:
        try:
            images.append((len(out), load_image(p)))
            out.append(Prediction(str(p)))
        except UserError as e:
            out.append(Prediction(str(p), error=str(e)))
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        probabilities = predict_probabilities(model, torch.stack([image for _, image in chunk]),
                                              normalization=normalization)
        for (i, _), probs in zip(chunk, probabilities, strict=True):
            if not torch.isfinite(probs).all():
                out[i].error = f"{out[i].path}: the model's outputs are not finite numbers (damaged weights?)"
                continue
            values, idx = probs.topk(min(top_k, len(classes)))
            out[i].top = [(classes[k], v) for k, v in zip(idx.tolist(), values.tolist(), strict=True)]
    return out
