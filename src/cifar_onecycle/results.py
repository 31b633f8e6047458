"""What a run reports: a row of metrics per epoch, the summary, and where the numbers came from."""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import __version__
from .device import device_name
from .model import count_parameters
from .recipe import Recipe

if TYPE_CHECKING:
    from .run_setup import RunSetup


@dataclass
class EpochMetrics:
    epoch: int
    lr: float               # the LR of the epoch's last step
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    train_seconds: float    # the training pass only, evaluation excluded
    images_per_second: float
    test_acc_tta: float | None = None  # with flip TTA; only when the recipe asks for it every epoch


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
        return self.history[-1].test_acc


def metrics_csv(history: list[EpochMetrics]) -> str:
    """A row per epoch; the TTA column only in runs that measure it."""
    names = [f.name for f in dataclasses.fields(EpochMetrics)]
    if not any(m.test_acc_tta is not None for m in history):
        names.remove("test_acc_tta")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for m in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(m).items() if k in names})
    return buf.getvalue()


def parse_metrics_csv(text: str) -> list[EpochMetrics]:
    """The rows of ``metrics_csv``, read by column name (a missing TTA column reads as None)."""
    types = {f.name: f.type for f in dataclasses.fields(EpochMetrics)}
    history: list[EpochMetrics] = []
    for row in csv.DictReader(io.StringIO(text)):
        values: dict[str, Any] = {}
        for name, kind in types.items():
            raw = row.get(name)
            if raw in (None, ""):
                if "None" not in str(kind):
                    raise ValueError(f"no {name} in row {len(history) + 1}")
                values[name] = None
            else:
                values[name] = int(raw) if name == "epoch" else float(raw)
        history.append(EpochMetrics(**values))
    return history


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    """The one line per epoch that a run shows."""
    return (f"epoch {m.epoch:>{len(str(epochs))}}/{epochs}  lr {m.lr:.5f}  "
            f"train loss {m.train_loss:.4f} acc {m.train_acc:6.2%}  "
            f"test loss {m.test_loss:.4f} acc {m.test_acc:6.2%}"
            + (f" tta {m.test_acc_tta:6.2%}  " if m.test_acc_tta is not None else "  ") +
            f"{m.train_seconds:6.1f}s  {m.images_per_second:7.1f} img/s")


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
    """The contents of summary.json (the final TTA accuracies are added by the caller)."""
    recipe = setup.recipe
    best = max(history, key=lambda h: h.test_acc)
    return {
        "final_test_acc": history[-1].test_acc,
        "best_test_acc": best.test_acc,
        "best_epoch": best.epoch,
        "final_test_loss": history[-1].test_loss,
        "final_train_acc": history[-1].train_acc,
        "epochs": recipe.epochs,
        "steps_per_epoch": setup.steps_per_epoch,
        "train_images": len(setup.train_images),
        "test_images": len(setup.test_images),
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
    }
