"""Test loss and accuracy: of any model on any images, and of a run's model on its test set."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .augment import CIFAR10_NORMALIZATION, Normalization, normalize, pad_reflect
from .device import autocast, eval_batch
from .distributed import Dist, all_reduce_sum, broadcast_buffers, test_shard

if TYPE_CHECKING:
    from .recipe import Recipe


@dataclass(frozen=True)
class Scores:
    """One pass over a split: the mean loss and accuracy; with TTA, those of the TTA logits too
    (the same pass: its unshifted forward is the plain one); with ``keep_probabilities``, each
    image's softmax of the plain logits, on the CPU, for a report's mistakes and confusion matrix."""
    loss: float
    acc: float
    tta_loss: float | None = None
    tta_acc: float | None = None
    probabilities: torch.Tensor | None = None

    def loss_and_acc(self, tta: bool) -> tuple[float, float]:
        """The loss and accuracy with TTA, or without."""
        if not tta:
            return self.loss, self.acc
        if self.tta_loss is None or self.tta_acc is None:
            raise ValueError("these scores were taken without TTA")
        return self.tta_loss, self.tta_acc


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
             batch_size: int = 0, precision: str = "fp32", channels_last: bool = True,
             tta: bool = False, tta_translate: int = 0,
             normalization: Normalization = CIFAR10_NORMALIZATION) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 NCHW ``images`` (on the model's device),
    standardised by ``normalization`` (the model's recipe's ``normalization``), ``batch_size`` images
    at a time (0: the device's, ``device.eval_batch``).
    ``tta``: test-time augmentation (``tta_logits``: the mirror, and with ``tta_translate`` shifts)."""
    return evaluate_sharded(model, images, labels, batch_size=batch_size, precision=precision,
                            channels_last=channels_last, dist=Dist(), tta=tta, tta_translate=tta_translate,
                            normalization=normalization).loss_and_acc(tta)


def logits_of(model: torch.nn.Module, images: torch.Tensor, precision: str = "fp32",
              channels_last: bool = True, normalization: Normalization = CIFAR10_NORMALIZATION) -> torch.Tensor:
    """fp32 logits of uint8 NCHW ``images`` (on the model's device), computed as every evaluation
    computes them: a report's mistakes must be those its accuracy counted (after the ``quick`` recipe
    in bf16, predictions in fp32 counted 2,199 mistakes where the accuracy had counted 2,202)."""
    inputs = normalize(images, normalization=normalization).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    with autocast(images.device, precision):
        # Always a copy (in fp32 too): a model compiled with CUDA graphs (`reduce-overhead`) writes
        # each call's output into the same memory, and TTA holds one output while it makes the next.
        return model(inputs).to(torch.float32, copy=True)


def tta_logits(model: torch.nn.Module, images: torch.Tensor, precision: str = "fp32", channels_last: bool = True,
               translate: int = 0, normalization: Normalization = CIFAR10_NORMALIZATION,
               plain: torch.Tensor | None = None) -> torch.Tensor:
    """Test-time augmentation: the mean of the logits of each image and its mirror (two forward
    passes); with ``translate``, half of that plus a quarter each of the same for the image shifted
    ``translate`` pixels up-left and down-right (reflect-padded; six passes), as airbench weighs them.
    ``plain``: the images' own logits (``logits_of``), when the caller has them: one pass fewer."""
    def mirrored(batch: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        own = logits_of(model, batch, precision, channels_last, normalization) if own is None else own
        return (own + logits_of(model, batch.flip(-1), precision, channels_last, normalization)) / 2

    if not translate:
        return mirrored(images, plain)
    size, padded = images.shape[-1], pad_reflect(images, translate)
    shifted = (padded[..., :size, :size], padded[..., 2 * translate:, 2 * translate:])
    return mirrored(images, plain) / 2 + (mirrored(shifted[0]) + mirrored(shifted[1])) / 4


@torch.no_grad()
def evaluate_sums(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  batch_size: int = 0, precision: str = "fp32", channels_last: bool = True,
                  tta: bool = False, tta_translate: int = 0, stop: Callable[[], bool] | None = None,
                  normalization: Normalization = CIFAR10_NORMALIZATION,
                  keep_probabilities: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The summed cross-entropy and number correct of the plain logits and (``tta``) of the TTA
    logits, as one float64 device tensor (no host sync); the plain logits' softmax on the CPU with
    ``keep_probabilities`` (a copy a batch); and whether ``stop()`` (asked before each batch: a stop
    signal must not wait for the whole test set, over a minute on a slow CPU) cut the pass short."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=images.device)  # loss, correct; TTA loss, TTA correct
    kept: list[torch.Tensor] = []
    stopped = False
    batch_size = eval_batch(batch_size, images.device)
    for start in range(0, len(images), batch_size):
        if stop is not None and stop():
            stopped = True
            break
        batch, targets = images[start:start + batch_size], labels[start:start + batch_size]
        plain = logits_of(model, batch, precision, channels_last, normalization)
        outputs = [plain]
        if tta:
            outputs.append(tta_logits(model, batch, precision, channels_last, tta_translate, normalization, plain))
        for i, logits in enumerate(outputs):
            sums[2 * i] += F.cross_entropy(logits, targets, reduction="sum")
            sums[2 * i + 1] += (logits.argmax(1) == targets).sum()
        if keep_probabilities:
            kept.append(F.softmax(plain, 1).cpu())
    model.train(was_training)
    return sums, torch.cat(kept) if kept else None, stopped


class EvaluationStopped(Exception):
    """A stop signal (on any rank) cut an evaluation short; no accuracy was measured."""


def evaluate_sharded(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                     precision: str, channels_last: bool, dist: Dist, tta: bool = False, tta_translate: int = 0,
                     stop: Callable[[], bool] | None = None, normalization: Normalization = CIFAR10_NORMALIZATION,
                     keep_probabilities: bool = False) -> Scores:
    """The scores of all of ``images`` (the test set or the validation split); raises
    ``EvaluationStopped`` when ``stop()`` said so on any rank (asked before each batch). Under
    torchrun each rank evaluates its own contiguous part with rank 0's BatchNorm statistics, and the
    sums are added up across ranks; probabilities are kept for a single process only (a rank holds
    those of its part alone)."""
    broadcast_buffers(model, dist)
    part = test_shard(len(images), dist.rank, dist.world)
    sums, probabilities, stopped = evaluate_sums(
        model, images[part], labels[part], batch_size=batch_size, precision=precision, channels_last=channels_last,
        tta=tta, tta_translate=tta_translate, stop=stop, normalization=normalization,
        keep_probabilities=keep_probabilities and dist.world == 1)
    loss, correct, tta_loss, tta_correct, stops = all_reduce_sum(
        torch.cat([sums, torch.tensor([float(stopped)], dtype=torch.float64, device=sums.device)]), dist).tolist()
    if stops:
        raise EvaluationStopped
    n = len(images)
    return Scores(loss / n, correct / n, tta_loss / n if tta else None, tta_correct / n if tta else None,
                  probabilities)


def evaluate_recipe(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe,
                    precision: str, *, dist: Dist | None = None, tta: bool = False,
                    stop: Callable[[], bool] | None = None, keep_probabilities: bool = False) -> Scores:
    """``evaluate_sharded`` with the evaluation settings of ``recipe``, the model's (its batch size,
    memory format, TTA shifts and normalisation): how a run, ``evaluate`` and a sweep score a model."""
    return evaluate_sharded(model, images, labels, batch_size=recipe.eval_batch_size, precision=precision,
                            channels_last=recipe.channels_last, dist=dist or Dist(), tta=tta,
                            tta_translate=recipe.tta_translate, stop=stop, normalization=recipe.normalization,
                            keep_probabilities=keep_probabilities)
