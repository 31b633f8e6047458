"""Test loss and accuracy: of any model on any images, and of a run's model on its test set."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .augment import CIFAR10_NORMALIZATION, Normalization, normalize, pad_reflect
from .device import autocast
from .distributed import Dist, all_reduce_sum, broadcast_buffers, test_shard


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
             batch_size: int = 1000, precision: str = "fp32", channels_last: bool = True,
             tta: bool = False, tta_translate: int = 0,
             normalization: Normalization = CIFAR10_NORMALIZATION) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 NCHW ``images`` (on the model's device),
    standardised by ``normalization`` (the model's recipe's ``normalization``).
    ``tta``: test-time augmentation (``tta_logits``: the mirror, and with ``tta_translate`` shifts)."""
    loss_sum, correct, _ = evaluate_sums(model, images, labels, batch_size=batch_size, precision=precision,
                                         channels_last=channels_last, tta=tta, tta_translate=tta_translate,
                                         normalization=normalization)
    return loss_sum.item() / len(images), correct.item() / len(images)


def logits_of(model: torch.nn.Module, images: torch.Tensor, precision: str = "fp32",
              channels_last: bool = True, normalization: Normalization = CIFAR10_NORMALIZATION) -> torch.Tensor:
    """fp32 logits of uint8 NCHW ``images`` (on the model's device), computed as every evaluation
    computes them: a report's mistakes must be those its accuracy counted (after the ``quick`` recipe
    in bf16, predictions in fp32 counted 2,199 mistakes where the accuracy had counted 2,202)."""
    inputs = normalize(images, normalization=normalization).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with autocast(images.device, precision):
        return model(inputs).float()


def tta_logits(model: torch.nn.Module, images: torch.Tensor, precision: str = "fp32", channels_last: bool = True,
               translate: int = 0, normalization: Normalization = CIFAR10_NORMALIZATION) -> torch.Tensor:
    """Test-time augmentation: the mean of the logits of each image and its mirror (two forward
    passes); with ``translate``, half of that plus a quarter each of the same for the image shifted
    ``translate`` pixels up-left and down-right (reflect-padded; six passes), as airbench weighs them."""
    def mirrored(batch: torch.Tensor) -> torch.Tensor:
        return (logits_of(model, batch, precision, channels_last, normalization)
                + logits_of(model, batch.flip(-1), precision, channels_last, normalization)) / 2

    if not translate:
        return mirrored(images)
    size, padded = images.shape[-1], pad_reflect(images, translate)
    shifted = (padded[..., :size, :size], padded[..., 2 * translate:, 2 * translate:])
    return mirrored(images) / 2 + (mirrored(shifted[0]) + mirrored(shifted[1])) / 4


@torch.no_grad()
def evaluate_sums(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  batch_size: int = 1000, precision: str = "fp32", channels_last: bool = True,
                  tta: bool = False, tta_translate: int = 0, stop: Callable[[], bool] | None = None,
                  normalization: Normalization = CIFAR10_NORMALIZATION) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Summed cross-entropy and number correct, as device tensors (no host sync), and whether
    ``stop()`` (asked before each batch: a stop signal must not wait for the whole test set, over a
    minute on a slow CPU) cut the pass short."""
    was_training = model.training
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    stopped = False
    for start in range(0, len(images), batch_size):
        if stop is not None and stop():
            stopped = True
            break
        batch, targets = images[start:start + batch_size], labels[start:start + batch_size]
        logits = (tta_logits(model, batch, precision, channels_last, tta_translate, normalization) if tta
                  else logits_of(model, batch, precision, channels_last, normalization))
        loss_sum += F.cross_entropy(logits, targets, reduction="sum")
        correct += (logits.argmax(1) == targets).sum()
    model.train(was_training)
    return loss_sum, correct, stopped


class EvaluationStopped(Exception):
    """A stop signal (on any rank) cut an evaluation short; no accuracy was measured."""


def evaluate_sharded(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                      precision: str, channels_last: bool, dist: Dist, tta: bool = False, tta_translate: int = 0,
                      stop: Callable[[], bool] | None = None,
                      normalization: Normalization = CIFAR10_NORMALIZATION) -> tuple[float, float]:
    """Loss and accuracy over all of ``images`` (the test set or the validation split); raises
    ``EvaluationStopped`` when ``stop()`` said so on any rank (asked before each batch). Under
    torchrun each rank evaluates its own contiguous part with rank 0's BatchNorm statistics, and the
    sums are added up across ranks."""
    broadcast_buffers(model, dist)
    part = test_shard(len(images), dist.rank, dist.world)
    loss_sum, correct, stopped = evaluate_sums(model, images[part], labels[part], batch_size=batch_size,
                                               precision=precision, channels_last=channels_last, tta=tta,
                                               tta_translate=tta_translate, stop=stop, normalization=normalization)
    total_loss, total_correct, stops = all_reduce_sum(
        torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(stopped), device=images.device,
                                                                        dtype=torch.float64)]), dist).tolist()
    if stops:
        raise EvaluationStopped
    return total_loss / len(images), total_correct / len(images)
