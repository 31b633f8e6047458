"""cifar-onecycle: the EVA6 Session 9 ResNet on CIFAR-10 (or CIFAR-100, or a folder of images) with the
One Cycle policy."""
from __future__ import annotations

__version__ = "0.1.0"

from .compare import Comparison, compare  # noqa: E402
from .data import CLASSES, Cifar10, LabelledImages, load_cifar10  # noqa: E402
from .datasets import load_dataset  # noqa: E402
from .errors import DatasetError, DivergenceError, Interrupted, NoLRFound, RecipeError, UserError, WriteError  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .model import ResNet9, count_parameters  # noqa: E402
from .recipe import Recipe, load_recipe  # noqa: E402
from .results import EpochMetrics, TrainResult  # noqa: E402
from .run_plan import RunPlan, SweepDryRun, dry_run, dry_run_sweep  # noqa: E402
from .schedule import lr_at, one_cycle_knots  # noqa: E402
from .seeds import SeedsResult, train_seeds  # noqa: E402
from .summary import summarize  # noqa: E402
from .sweep import SweepResult, collect, sweep  # noqa: E402
from .training import train  # noqa: E402

__all__ = ["CLASSES", "Cifar10", "Comparison", "DatasetError", "DivergenceError", "EpochMetrics", "Interrupted",
           "LabelledImages", "NoLRFound", "Recipe", "RecipeError", "ResNet9", "RunPlan", "SeedsResult", "SweepDryRun",
           "SweepResult", "TrainResult", "UserError", "WriteError", "__version__", "collect", "compare",
           "count_parameters", "dry_run", "dry_run_sweep", "evaluate", "load_cifar10", "load_dataset", "load_recipe",
           "lr_at", "one_cycle_knots", "summarize", "sweep", "train", "train_seeds"]
