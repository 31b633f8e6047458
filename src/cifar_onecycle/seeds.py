"""One recipe trained N times with seeds k..k+N-1, each in its own run folder, and the spread of
their final test accuracies: one run's number says little when seeds differ by a few tenths.

The folder of a multi-seed run holds recipe.toml (the recipe with the first seed), seeds.json (which
seeds), a sub-folder per seed (``seed<k>/``, an ordinary run folder) and, at the end, summary.json
with each final accuracy's ``results.spread`` over the runs (mean, standard deviation, standard
error, min and max) and its values, curves.png (each seed's curves and their mean) and seeds.md
(the table and the picture, a page for a README). Only the last epoch of each run counts: no best
epoch, no best seed.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .clock import Laps, about_left
from .data import LabelledImages, recorded_data_dir
from .device import resolve_placement
from .distributed import init_distributed
from .errors import Interrupted
from .files import FolderLock, atomic_write
from .recipe import Recipe, as_recipe, check_seed_range
from .results import spread
from .run_folder import CURVES_PNG, METRICS, SEEDS, SEEDS_MD, SUMMARY, RunFolder
from .run_setup import fit_to_data
from .signals import signals_for_tests
from .training import RunOptions, check_same_recipe, data_folder, load_data, run_device, train_folder

# The accuracies summarised over seeds; the validation ones are None in runs without a holdout, the
# last of each split in runs without a weight average.
ACCURACIES = ("final_test_acc", "final_test_acc_tta", "final_train_acc", "final_test_acc_without_ema",
              "final_val_acc", "final_val_acc_tta", "final_val_acc_without_ema")


@dataclass
class SeedsResult:
    """What ``train_seeds`` returns: the summary over seeds and each run's own summary."""

    recipe: Recipe
    summary: dict[str, Any]
    runs: list[dict[str, Any]] = field(repr=False)
    run_dir: Path | None = None


def seeds_summary(recipe: Recipe, seeds: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """summary.json of a multi-seed run, from the runs' own summaries (in seed order)."""
    out: dict[str, Any] = {"seeds": seeds, "runs": len(runs), "epochs": recipe.epochs}
    for name in ACCURACIES:
        values = [r[name] for r in runs if r.get(name) is not None]
        out[name] = {**spread(values), "values": values} if values and len(values) == len(runs) else None
    first = runs[0]
    for key in ("test_images", "train_images", "parameters", "device", "precision", "torch", "cifar_onecycle",
                "git_commit", "data_dir"):
        out[key] = first.get(key)
    out["total_seconds"] = round(sum(r["total_seconds"] for r in runs), 2)
    out["per_run"] = [{"seed": s, "folder": f"seed{s}", **{k: r.get(k) for k in ACCURACIES}}
                      for s, r in zip(seeds, runs, strict=False)]
    return out


def final_accuracies(summary: dict[str, Any]) -> str:
    """A run's final accuracies in words: validation first (what settings are chosen on), then test."""
    val = (f"validation {summary['final_val_acc']:.2%} (flip TTA {summary['final_val_acc_tta']:.2%}), "
           if summary.get("final_val_acc") is not None else "")
    return f"final {val}test accuracy {summary['final_test_acc']:.2%} (flip TTA {summary['final_test_acc_tta']:.2%})"


def train_seeds(recipe: Recipe | str | Path | None = None, seeds: int = 1, *, out: str | Path | None = None,
                overwrite: bool = False, resume: str | Path | None = None, data_dir: str | Path | None = None,
                download: bool = True, data: LabelledImages | None = None, progress: bool = True,
                **train_args: Any) -> SeedsResult:
    """Train ``recipe`` (as ``train`` takes it) with seeds ``recipe.seed`` ..
    ``recipe.seed + seeds - 1``, one after another.

    ``out``: the folder for the runs (none: nothing is written). ``resume``: such a folder, to go
    on where it stopped: finished runs are read back, a run with a checkpoint is resumed, the rest
    start. ``train_args`` go to each ``train`` (``find_lr_max``, ``report``, ``tensorboard``,
    ``checkpoints``).
    """
    if resume is None:
        recipe = as_recipe(recipe)
        first, count = recipe.seed, seeds
        check_seed_range(first, count)
    elif recipe is not None:
        recipe = as_recipe(recipe)  # to be checked against the resumed set's own
    main = init_distributed(run_device(recipe, resume)).main  # under torchrun only rank 0 writes
    folder: RunFolder | None = None
    with contextlib.ExitStack() as held:  # the set's folder, held until its results are written
        if resume is not None:
            folder = RunFolder(resume)
            if main:  # before recipe.toml and seeds.json are read: another process may be writing them
                held.enter_context(FolderLock(folder.path, "resume"))
            saved = folder.read_recipe()
            first, count, saved_data_dir = folder.read_seeds()
            if data_dir is None and data is None and saved_data_dir is not None:
                data_dir, download = recorded_data_dir(saved_data_dir, folder.path / SEEDS), False
            if recipe is not None:
                check_same_recipe(recipe, saved, folder.path)
            recipe = saved
        assert recipe is not None  # given, or the resumed set's own
        resolve_placement(recipe)  # a device this machine lacks: refused before loading anything
        # Read once for all the runs, and before any folder is made: a missing data set leaves nothing.
        if data is None:
            data_dir = data_folder(data_dir, None)
            data = load_data(recipe, data_dir, download, progress, signals_for_tests())
        fitted = fit_to_data(recipe, data)  # the data's statistics, once for all the seeds
        if out is not None and resume is None and main:
            folder = RunFolder.create(out, overwrite, set_of_seeds=True, held=held)
            folder.write_recipe(recipe)
            folder.write_seeds(first, count, str(data_dir) if data_dir else None)
        started = time.perf_counter()
        options = RunOptions(data_dir=data_dir, download=download, progress=progress, **train_args)
        runs: list[dict[str, Any]] = []
        run_laps = Laps()  # the seeds trained in this call: the time left shown
        for i, seed in enumerate(range(first, first + count), 1):
            run = RunFolder.inside(folder.path, f"seed{seed}") if folder else None
            if run and run.has(SUMMARY):  # finished before a resume
                runs.append(run.read_summary())
                continue
            if progress and main:
                left = about_left(run_laps.seconds, count - i + 1)
                tqdm.write(f"seed {seed} ({i} of {count}" + (f"; {left})" if left else ")"))
            try:
                result = train_folder(run.path if run else None, fitted.replace(seed=seed), data, options)
            except Interrupted as e:
                if folder is None:
                    raise
                raise Interrupted(f"{e}; or, to go on with all {count} seeds: cifar-onecycle train --resume "
                                  f"{folder.path}") from None
            runs.append(result.summary)
            run_laps.lap()
            if progress and main:
                tqdm.write(f"seed {seed}: {final_accuracies(result.summary)}")
        seed_list = list(range(first, first + count))
        summary = seeds_summary(recipe, seed_list, runs)
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)  # this call's, resumed parts excluded
        if folder and main:
            write_seeds_results(folder, seed_list, summary)
    return SeedsResult(recipe, summary, runs, folder.path if folder else None)


def write_seeds_results(folder: RunFolder, seeds: list[int], summary: dict[str, Any]) -> None:
    """summary.json over the seeds, curves.png (each seed's curves and their mean: the runs with a
    metrics.csv) and seeds.md (the table and the picture). The metrics are read before anything is
    written: a damaged one leaves all as they were."""
    from .report import save_png
    from .sweep_report import plot_seed_curves, seeds_markdown

    runs = {seed: RunFolder.inside(folder.path, f"seed{seed}") for seed in seeds}
    histories = {seed: run.read_metrics() for seed, run in runs.items() if run.has(METRICS)}
    folder.write_summary(summary)
    if histories:
        save_png(plot_seed_curves(histories), folder.path / CURVES_PNG)  # each seed's curves and their mean
    atomic_write(folder.path / SEEDS_MD, seeds_markdown(summary, curves=bool(histories)))
