"""What a run reports: a row of metrics per epoch, the summary, and where the numbers came from."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import statistics
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .device import device_name
from .files import check_plain
from .model import count_parameters
from .recipe import MAX_EPOCHS, Recipe, short_number

if TYPE_CHECKING:
    from .run_setup import RunSetup


@dataclass
class EpochMetrics:
    """One epoch's row. Each epoch is evaluated on one split: the test set (``test_*``), or with a
    holdout the validation split (``val_*``, the ``test_*`` fields None); ``eval_*`` is whichever."""

    epoch: int
    lr: float               # the LR of the epoch's last step
    train_loss: float
    train_acc: float
    test_loss: float | None
    test_acc: float | None
    train_seconds: float    # the training pass only, evaluation excluded
    images_per_second: float
    test_acc_tta: float | None = None  # with flip TTA; only when the recipe asks for it every epoch
    val_loss: float | None = None
    val_acc: float | None = None
    val_acc_tta: float | None = None
    tflops: float | None = None   # achieved TFLOP/s of the training pass; on a GPU only

    @property
    def split(self) -> str:
        return "test" if self.val_acc is None else "val"

    @property
    def eval_loss(self) -> float:
        loss = self.test_loss if self.val_loss is None else self.val_loss
        assert loss is not None, "an epoch row holds a test or a validation loss"
        return loss

    @property
    def eval_acc(self) -> float:
        acc = self.test_acc if self.val_acc is None else self.val_acc
        assert acc is not None, "an epoch row holds a test or a validation accuracy"
        return acc

    @property
    def eval_acc_tta(self) -> float | None:
        return self.test_acc_tta if self.val_acc is None else self.val_acc_tta


SPLIT_NAMES = {"test": "test", "val": "validation"}


def split_of(accuracy: str) -> str:
    """The split ("val" or "test") a summary's accuracy (``final_val_acc``, ``final_test_acc_tta``,
    ...) was measured on."""
    return "val" if accuracy.startswith("final_val_") else "test"


@dataclass
class TrainResult:
    """What ``train`` returns: the recipe, a row per epoch, the summary and the trained model (the
    weight average when the recipe keeps one: the model the test accuracies describe)."""

    recipe: Recipe
    history: list[EpochMetrics]
    summary: dict[str, Any]
    model: torch.nn.Module = field(repr=False)
    run_dir: Path | None = None

    @property
    def final_test_acc(self) -> float:
        """The test accuracy of the delivered model (with a holdout: measured once, at the end)."""
        return self.summary["final_test_acc"]


def metrics_csv(history: list[EpochMetrics]) -> str:
    """A row per epoch; only the columns the run measures (test or validation, TTA or not)."""
    names = [f.name for f in dataclasses.fields(EpochMetrics)
             if any(getattr(m, f.name) is not None for m in history)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for m in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(m).items() if k in names})
    return buf.getvalue()


def parse_metrics_csv(text: str) -> list[EpochMetrics]:
    """The rows of ``metrics_csv``, read by column name (a missing optional column reads as None),
    each checked by ``history_from_rows``. A field over csv's limit (128 KB) is a ``ValueError``."""
    rows: list[dict[str, Any]] = []
    try:
        for row in csv.DictReader(io.StringIO(text)):
            if len(rows) == MAX_EPOCHS:
                raise ValueError(f"more than {MAX_EPOCHS:,} rows; a run has at most {MAX_EPOCHS:,} epochs")
            rows.append({name: None if raw in (None, "") else int(raw) if name == "epoch" else float(raw)
                         for name, raw in row.items() if name in _KINDS})
    except csv.Error as e:
        raise ValueError(f"row {len(rows) + 1}: {e}") from None
    return history_from_rows(rows)


_KINDS = {f.name: str(f.type) for f in dataclasses.fields(EpochMetrics)}
# Where each number of a row lies: accuracies are fractions; losses, LRs, times and rates are not negative.
_FRACTIONS = {"train_acc", "test_acc", "test_acc_tta", "val_acc", "val_acc_tta"}


def history_from_rows(rows: list[Any]) -> list[EpochMetrics]:
    """Rows of a run's history (from metrics.csv, or a checkpoint's ``asdict`` rows, which may be
    someone else's) as ``EpochMetrics``: epochs 1, 2, ... in order; every number of its column's
    type, finite and in its range; a test or a validation loss and accuracy in each row. Anything
    else is a ``ValueError`` naming the row: a report, or a resumed run, must not meet it later."""
    history: list[EpochMetrics] = []
    if len(rows) > MAX_EPOCHS:
        raise ValueError(f"{len(rows):,} rows; a run has at most {MAX_EPOCHS:,} epochs")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or set(row) - set(_KINDS):
            raise ValueError(f"row {number} is not a row of epoch metrics")
        values: dict[str, Any] = {}
        for name, kind in _KINDS.items():
            value = row.get(name)
            if value is None:
                if "None" not in kind:
                    raise ValueError(f"no {name} in row {number}")
            elif name == "epoch":
                if type(value) is not int or value != number:
                    raise ValueError(f"row {number} is epoch {short_number(value)}, not {number}")
            elif type(value) not in (int, float) or not math.isfinite(value) or value < 0 or \
                    name in _FRACTIONS and value > 1:
                raise ValueError(f"{name} {short_number(value)} in row {number} is not a "
                                 f"{'fraction' if name in _FRACTIONS else 'finite number >= 0'}")
            values[name] = None if value is None else value if name == "epoch" else float(value)
        if values["test_acc"] is None and values["val_acc"] is None:
            raise ValueError(f"no test_acc or val_acc in row {number}")
        for split in ("test", "val"):
            if (values[f"{split}_loss"] is None) != (values[f"{split}_acc"] is None):
                raise ValueError(f"row {number} has one of {split}_loss and {split}_acc without the other")
        history.append(EpochMetrics(**values))
    return history


# What a run's summary.json holds, by kind, for ``check_run_summary``; keys with "_acc" in their
# name are accuracies (fractions), other keys may hold any plain JSON value.
_SUMMARY_COUNTS = ("steps_per_epoch", "epochs", "best_epoch", "train_images", "test_images", "val_images", "parameters",
                   "num_classes", "skipped_images")
_SUMMARY_REALS = ("total_seconds", "lr_min", "lr_max", "final_test_loss", "final_val_loss")
_SUMMARY_TEXTS = ("device", "precision", "torch", "cifar_onecycle", "git_commit", "data_dir", "dataset",
                  "weights_from")
_SUMMARY_REQUIRED = ("final_test_acc", "total_seconds", "steps_per_epoch")


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Runs' final accuracies summarised, as sweep.json and a set of seeds' summary.json give them:
    n, mean, the sample standard deviation (n - 1: one run's spread), the mean's standard error
    (std over the square root of n), min and max; std and sem None below two values, and all but n
    None for none."""
    n = len(values)
    std = statistics.stdev(values) if n > 1 else None
    return {"n": n, "mean": statistics.fmean(values) if n else None, "std": std,
            "sem": std / math.sqrt(n) if std is not None else None,
            "min": min(values) if n else None, "max": max(values) if n else None}


def paired_difference(values: Mapping[int, float | None], baseline: Mapping[int, float | None]) -> dict[str, Any]:
    """The differences of ``values`` from ``baseline``, both by seed, over the seeds that have a
    value in both, summarised as ``spread`` does: a sweep's point against its baseline, a compared
    run against the first."""
    return spread([value - base for seed, value in values.items()
                   if value is not None and (base := baseline.get(seed)) is not None])


def mean_curve(histories: Iterable[Sequence[EpochMetrics]]) -> list[tuple[int, float, float]]:
    """(epoch, training loss, evaluation accuracy) rows, each epoch's mean over the runs that reached
    it: a sweep point's curve over its seeds, a set of seeds' mean curve."""
    sums: dict[int, list[float]] = {}  # epoch: [runs, loss sum, accuracy sum]
    for history in histories:
        for m in history:
            entry = sums.setdefault(m.epoch, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += m.train_loss
            entry[2] += m.eval_acc
    return [(epoch, loss / n, acc / n) for epoch, (n, loss, acc) in sorted(sums.items())]


def check_run_summary(summary: dict[str, Any]) -> None:
    """A ``ValueError`` unless ``summary`` (a run's summary.json, which may be someone else's)
    holds what ``run_summary`` writes wherever a reader will use it: the test accuracy, the time and
    the steps an epoch; every accuracy a fraction, every count an integer, every real finite."""
    for key in _SUMMARY_REQUIRED:
        if summary.get(key) is None:
            raise ValueError(f"no {key}")
    for key, value in summary.items():
        if value is None:
            continue
        if key in _SUMMARY_COUNTS:
            ok = type(value) is int and value >= (1 if key == "steps_per_epoch" else 0)
        elif key in _SUMMARY_REALS or "_acc" in key and key != "per_class_accuracy":
            ok = type(value) in (int, float) and math.isfinite(value) and value >= 0 and (
                "_acc" not in key or value <= 1)
        elif key in _SUMMARY_TEXTS:
            ok = isinstance(value, str)
        else:
            check_plain(value, key)
            ok = key != "lr_found" or isinstance(value, dict)
        if not ok:
            raise ValueError(f"{key} {short_number(value)} is not what a run writes there")


def format_epoch(m: EpochMetrics, epochs: int, left: str = "") -> str:
    """The one line per epoch that a run shows; ``left``, the run's time left (``clock.about_left``)."""
    tta = m.eval_acc_tta
    return (f"epoch {m.epoch:>{len(str(epochs))}}/{epochs}  lr {m.lr:.5f}  "
            f"train loss {m.train_loss:.4f} acc {m.train_acc:6.2%}  "
            f"{m.split} loss {m.eval_loss:.4f} acc {m.eval_acc:6.2%}"
            + (f" tta {tta:6.2%}  " if tta is not None else "  ") +
            f"{m.train_seconds:6.1f}s  {m.images_per_second:7.1f} img/s"
            + (f"  {m.tflops:.0f} TFLOP/s" if m.tflops is not None else "") + (f"  {left}" if left else ""))


def git_commit() -> str | None:
    """The commit this package's source is: the environment's CIFAR_ONECYCLE_COMMIT when set (a copy
    of the tree shipped to another machine says there which commit it is; the copy's own .git, if
    it has one, may be stale), else the git checkout's HEAD, else None."""
    if os.environ.get("CIFAR_ONECYCLE_COMMIT"):
        return os.environ["CIFAR_ONECYCLE_COMMIT"]
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                           text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_summary(setup: RunSetup, history: list[EpochMetrics], lr_found: dict | None, seconds: float,
                data_dir: str | None, commit: str | None) -> dict[str, Any]:
    """The contents of summary.json (the final TTA accuracies and, with a holdout, the final test
    accuracy are added by the caller). The best epoch is that of the split each epoch evaluates."""
    recipe = setup.recipe
    split = history[-1].split
    best = max(history, key=lambda h: h.eval_acc)
    return {
        f"final_{split}_acc": history[-1].eval_acc,
        f"best_{split}_acc": best.eval_acc,
        "best_epoch": best.epoch,
        f"final_{split}_loss": history[-1].eval_loss,
        "final_train_acc": history[-1].train_acc,
        "epochs": recipe.epochs,
        "steps_per_epoch": setup.steps_per_epoch,
        "train_images": len(setup.train_images),
        "test_images": len(setup.test_images),
        "val_images": 0 if setup.val_images is None else len(setup.val_images),
        "lr_min": recipe.lr_min,
        "lr_max": recipe.lr_max,
        "lr_found": lr_found,
        "total_seconds": round(seconds, 2),
        "parameters": count_parameters(setup.model),
        "device": device_name(setup.device),
        "precision": setup.precision,
        "torch": torch.__version__,
        "cifar_onecycle": __version__,
        "git_commit": commit,
        "data_dir": data_dir,
        "dataset": recipe.dataset,
        "num_classes": recipe.num_classes,
        "skipped_images": len(setup.data.skipped),
    }
