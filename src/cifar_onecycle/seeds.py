"""One recipe trained N times with seeds k..k+N-1, each in its own run folder, and the spread of
their final test accuracies: one run's number says little when seeds differ by a few tenths.

The folder of a multi-seed run holds recipe.toml (the recipe with the first seed), seeds.json (which
seeds), a sub-folder per seed (``seed<k>/``, an ordinary run folder) and, at the end, summary.json
with the mean, standard deviation, min and max over the runs. Only the last epoch of each run counts:
no best epoch, no best seed.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT, atomic_write
from .data import Cifar10, load_cifar10
from .distributed import init_distributed
from .errors import UserError
from .recipe import Recipe, load_recipe
from .train import (Interrupted, check_fits, check_same_recipe, prepare_run_dir, resolve_device, resolve_precision,
                    train)

SEEDS_FILE = "seeds.json"
# The accuracies summarised over seeds; the last is None in runs without a weight average.
ACCURACIES = ("final_test_acc", "final_test_acc_tta", "final_train_acc", "final_test_acc_without_ema")


@dataclass
class SeedsResult:
    """What ``train_seeds`` returns: the summary over seeds and each run's own summary."""

    recipe: Recipe
    summary: dict[str, Any]
    runs: list[dict[str, Any]] = field(repr=False)
    run_dir: Path | None = None


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1; 0 for one value), min and max of ``values``."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def seeds_summary(recipe: Recipe, seeds: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json of a multi-seed run, from the runs' own summaries (in seed order)."""
    out: dict[str, Any] = {"seeds": seeds, "runs": len(runs), "epochs": recipe.epochs}
    for name in ACCURACIES:
        values = [r.get(name) for r in runs]
        out[name] = spread(values) if all(v is not None for v in values) else None
    first = runs[0]
    for key in ("test_images", "train_images", "parameters", "device", "precision", "torch", "cifar_onecycle",
                "git_commit", "data_dir"):
        out[key] = first.get(key)
    out["total_seconds"] = round(sum(r["total_seconds"] for r in runs), 2)
    out["per_run"] = [{"seed": s, "folder": f"seed{s}", **{k: r.get(k) for k in ACCURACIES}}
                      for s, r in zip(seeds, runs)]
    return out


def train_seeds(recipe: Recipe | None = None, seeds: int = 1, *, out: str | Path | None = None,
                overwrite: bool = False, resume: str | Path | None = None, data_dir: str | Path | None = None,
                download: bool = True, data: Cifar10 | None = None, progress: bool = True,
                **train_args: Any) -> SeedsResult:
    """Train ``recipe`` with seeds ``recipe.seed`` .. ``recipe.seed + seeds - 1``, one after another.

    ``out``: the folder for the runs (none: nothing is written). ``resume``: such a folder, to go
    on where it stopped: finished runs are read back, a run with a checkpoint is resumed, the rest
    start. ``train_args`` go to each ``train`` (``find_lr_max``, ``report``, ``tensorboard``,
    ``checkpoints``).
    """
    if resume is not None:
        run_dir = Path(resume)
        saved = load_recipe(run_dir / "recipe.toml")
        try:
            info = json.loads((run_dir / SEEDS_FILE).read_text())
            first, count = int(info["first_seed"]), int(info["seeds"])
            data_dir = data_dir or info.get("data_dir")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume {run_dir}: not a multi-seed run folder ({SEEDS_FILE}: {e})") from None
        if recipe is not None:
            check_same_recipe(recipe, saved, run_dir)
        recipe = saved
    else:
        recipe = recipe or Recipe()
        if seeds < 1:
            raise UserError(f"--seeds {seeds}: give at least 1")
        first, count = recipe.seed, seeds
        run_dir = Path(out) if out is not None else None
        resolve_precision(recipe.precision, resolve_device(recipe.device))  # a bad device: refused now
    # Read once for all the runs, and before any folder is made: a missing data set leaves nothing.
    if data is None:
        data_dir = str(Path(data_dir or "data").resolve())
        data = load_cifar10(data_dir, download=download)
    check_fits(recipe, data)
    main = init_distributed(recipe.device).main  # under torchrun only rank 0 writes
    if run_dir and resume is None and main:
        prepare_run_dir(run_dir, overwrite)
        atomic_write(run_dir / "recipe.toml", recipe.to_toml())
        atomic_write(run_dir / SEEDS_FILE, json.dumps({"first_seed": first, "seeds": count,
                                                       "data_dir": data_dir and str(data_dir)}) + "\n")
    started = time.perf_counter()
    seed_list = list(range(first, first + count))
    runs: list[dict[str, Any]] = []
    for i, seed in enumerate(seed_list, 1):
        sub = run_dir / f"seed{seed}" if run_dir else None
        if sub and (sub / "summary.json").is_file():  # finished before a resume
            runs.append(json.loads((sub / "summary.json").read_text()))
            continue
        if progress and main:
            tqdm.write(f"seed {seed} ({i} of {count})")
        try:
            if sub and (sub / CHECKPOINT).is_file():
                result = train(resume=sub, data_dir=data_dir, data=data, progress=progress, **train_args)
            else:  # a folder a killed run left without a checkpoint is started again
                result = train(recipe.replace(seed=seed), out=sub, overwrite=True, data_dir=data_dir, data=data,
                               progress=progress, **train_args)
        except Interrupted as e:
            if run_dir is None:
                raise
            raise Interrupted(f"{e}; or, to go on with all {count} seeds: cifar-onecycle train --resume "
                              f"{run_dir}") from None
        runs.append(result.summary)
        if progress and main:
            tqdm.write(f"seed {seed}: final test accuracy {result.summary['final_test_acc']:.2%} "
                       f"(flip TTA {result.summary['final_test_acc_tta']:.2%})")
    summary = seeds_summary(recipe, seed_list, runs)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)  # this call's, resumed parts excluded
    if run_dir and main:
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return SeedsResult(recipe, summary, runs, run_dir)
