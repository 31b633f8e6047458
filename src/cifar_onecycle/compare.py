"""Runs side by side, what a learner draws by hand after a few trainings ("did label smoothing
help?"): the recipe settings that differ between them, their final accuracies (a set of seeds'
mean and standard error), each one's difference from the first paired by seed, and their curves in
one picture. ``cifar-onecycle compare RUN_DIR...`` prints the table; ``compare(...)`` returns it.

A run to compare is one run's folder (finished, failed, or still training: its epochs so far), a
set of seeds' (``train --seeds``) or a sweep point's (``POINT/`` and its ``seed<k>/`` runs). The
folders may be someone else's: they are read through ``RunFolder``'s checked readers only.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import UserError
from .recipe import DATA_FIELDS, Recipe
from .results import SPLIT_NAMES, mean_curve, paired_difference, spread
from .run_folder import FAILED, METRICS, RECIPE, SUMMARY, RunFolder
from .sweep import ACCURACIES, selection_accuracy
from .sweep_plan import format_value

# As a sweep's curves picture (``sweep_report.MAX_CURVES``): past a couple of dozen lines no colour
# tells them apart.
MAX_COMPARED = 20
SEED_FOLDER = re.compile(r"seed(0|[1-9][0-9]{0,9})")  # a set's runs, as train --seeds and sweep name them
MAX_SEEDS_NAMED = 5  # a table's cell of seeds that do not run on names this many
# The settings never shown as a difference: the seed has a column of its own, and the data's classes
# and statistics follow its data set (a list of 100 names is no table cell).
NOT_COMPARED = ("seed", *DATA_FIELDS)


@dataclass
class ComparedRun:
    """One run, or a set of runs of one recipe over seeds, as compared."""

    name: str                                  # the folder as given: the table's and the legend's name
    recipe: Recipe                             # its recipe (a set's first run's)
    outcomes: dict[int, str]                   # by seed: finished, diverged, no LR found or unfinished
    finals: dict[int, dict[str, float]]        # by finished seed: its final accuracies (ACCURACIES)
    seconds: list[float]                       # each finished run's total_seconds
    curve: list[tuple[int, float, float]]      # (epoch, training loss, accuracy), the mean over the runs
    curve_runs: int                            # the runs it is the mean of: those that did not fail
    split: str | None                          # the split the curve's accuracy is on; None without a curve


@dataclass
class Comparison:
    """What ``compare`` returns: the runs, the settings in which their recipes differ, and per run
    and accuracy its ``spread`` and its difference from the first run paired by seed (sweep.json's
    shape: ``stats["points"]``, a point a run, the first the baseline)."""

    runs: list[ComparedRun]
    settings: list[str]
    stats: dict[str, Any]
    folder: str | None = None   # the folder the runs' names are relative to (their common one), if any

    def table(self) -> list[list[str]]:
        """The table ``compare`` prints, its header first: a row a run, the settings that differ,
        their seeds, the runs (those that did not finish counted by outcome), each accuracy's mean
        in % with its standard error in brackets, the difference from the first run and the time of
        a run."""
        from .clock import format_seconds
        from .sweep_report import sweep_table_rows

        rows = sweep_table_rows(self.stats)
        table = [["run", *self.settings, "seeds", *rows[0][1:], "time a run"]]
        for run, row in zip(self.runs, rows[1:], strict=True):
            seconds = sum(run.seconds) / len(run.seconds) if run.seconds else None
            table.append([row[0], *(format_value(getattr(run.recipe, k)) for k in self.settings),
                          seed_list(sorted(run.outcomes)), *row[1:],
                          format_seconds(seconds) if seconds is not None else "-"])
        return table

    def figure(self) -> Any:
        """Each run's training loss and accuracy per epoch (a set's mean over its runs that did
        not fail), the first run black and dashed."""
        from .report import drawn
        from .sweep_report import Curve, plot_curve_pair

        splits = {run.split for run in self.runs if run.split}
        lines: list[Curve] = []
        for i, run in enumerate(self.runs):
            if not run.curve:
                continue
            values = [f"{k}={format_value(getattr(run.recipe, k))}" for k in self.settings]
            label = drawn(run.name) + (f": {', '.join(values)}" if not all(v in run.name for v in values) else "")
            label += " (baseline)" if i == 0 else ""
            label += f" (mean of {run.curve_runs} runs)" if run.curve_runs > 1 else ""
            label += f" ({SPLIT_NAMES[run.split or 'test']})" if len(splits) > 1 else ""
            style = {"color": "black", "ls": "--", "lw": 1.5} if i == 0 else {"color": f"C{i % 10}", "lw": 1.2}
            lines.append((" " + label if label.startswith("_") else label,  # matplotlib's legend hides "_x"
                          [epoch for epoch, _, _ in run.curve], [loss for _, loss, _ in run.curve],
                          [acc for _, _, acc in run.curve], {"marker": ".", **style}))
        accuracy = SPLIT_NAMES[splits.pop()].capitalize() if len(splits) == 1 else "Validation or test (see each line)"
        return plot_curve_pair(lines, "Training loss", f"{accuracy} accuracy")


def compare(folders: Sequence[str | Path]) -> Comparison:
    """The runs of ``folders`` (2 to ``MAX_COMPARED``: one run's, a set of seeds' or a sweep
    point's folders) side by side, the first the baseline. They are compared on the validation
    accuracy when every one holds images out (``holdout``), else on the test accuracy."""
    if not 2 <= len(folders) <= MAX_COMPARED:
        raise UserError(f"compare: give 2 to {MAX_COMPARED} run folders, not {len(folders)}")
    seen: dict[Path, str] = {}
    for folder in folders:
        where = Path(folder).resolve()
        if where in seen:
            raise UserError(f"compare: {folder} is {seen[where]} again; give each run once")
        seen[where] = str(folder)
    common, names = short_names([str(folder) for folder in folders])
    runs = [read_compared(folder, name) for folder, name in zip(folders, names, strict=True)]
    settings = [f.name for f in fields(Recipe) if f.name not in NOT_COMPARED
                and len({format_value(getattr(run.recipe, f.name)) for run in runs}) > 1]
    selection = selection_accuracy(runs[0].recipe) if all(run.recipe.holdout for run in runs) else "final_test_acc"
    return Comparison(runs, settings, comparison_stats(runs, settings, selection), common)


def seed_list(seeds: list[int]) -> str:
    """Seeds for a table's cell: ``0``, ``0-3`` when they run on, else ``0, 2, 5`` (the first
    ``MAX_SEEDS_NAMED``, then how many more)."""
    if len(seeds) > 1 and seeds[-1] - seeds[0] == len(seeds) - 1:
        return f"{seeds[0]}-{seeds[-1]}"
    more = len(seeds) - MAX_SEEDS_NAMED
    return ", ".join(map(str, seeds[:MAX_SEEDS_NAMED])) + (f" and {more} more" if more > 0 else "")


def short_names(folders: list[str]) -> tuple[str | None, list[str]]:
    """The folders named from the one that holds them all (``runs/a``, ``runs/b``: ``a`` and ``b``
    in ``runs``), a table's first column and a legend being narrow; as given when they share none."""
    paths = [os.path.normpath(folder) for folder in folders]
    try:
        common = os.path.commonpath([os.path.dirname(path) or "." for path in paths])
    except ValueError:  # absolute and relative ones, or other drives
        return None, folders
    if common in ("", ".", os.sep):
        return None, folders
    return common, [os.path.relpath(path, common) for path in paths]


def read_compared(folder: str | Path, name: str | None = None) -> ComparedRun:
    """A run folder, a set of seeds' or a sweep point's, as compared (``name``: how it is shown,
    by default as given)."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{folder}: not a folder; give a run's folder (train --out)")
    given = RunFolder(path)
    kind = given.set_of_runs()
    if kind == "a sweep":
        raise UserError(f"{folder}: a sweep's folder, whose sweep.md and sweep_curves.png compare its points; "
                        f"give its points' folders ({path / 'POINT'}) to compare them with other runs")
    if kind is None and given.has(RECIPE):
        recipe = given.read_recipe()
        runs = {recipe.seed: given}
    else:  # a set of seeds, or a sweep point: its seed<k>/ runs
        found = sorted((int(m[1]), entry) for entry in path.iterdir()
                       if (m := SEED_FOLDER.fullmatch(entry.name)) and (entry / RECIPE).is_file())
        if not found:
            raise UserError(f"{folder}: no run in it (no {RECIPE}, and no seed<k>/ folder with one); give a run's "
                            f"folder (train --out), a set of seeds' (train --seeds) or a sweep point's")
        runs = {seed: RunFolder(entry) for seed, entry in found}
        recipe = runs[found[0][0]].read_recipe()
    outcomes, finals, seconds, histories = {}, {}, [], []
    for seed, run in runs.items():
        if run.has(SUMMARY):
            summary = run.read_summary()
            outcomes[seed] = "finished"
            finals[seed] = {k: summary[k] for k in ACCURACIES if summary.get(k) is not None}
            seconds.append(summary["total_seconds"])
        else:
            outcomes[seed] = run.read_failed()[0] if run.has(FAILED) else "unfinished"
        if run.has(METRICS) and outcomes[seed] in ("finished", "unfinished"):
            histories.append(run.read_metrics())
    curve = mean_curve(histories)
    split = histories[0][-1].split if histories else None
    return ComparedRun(name or str(folder), recipe, outcomes, finals, seconds, curve, len(histories), split)


def comparison_stats(runs: list[ComparedRun], settings: list[str], selection: str) -> dict[str, Any]:
    """Per run (a point of sweep.json's shape) and accuracy, the ``spread`` of its finished runs
    and, but for the first, the difference from the first paired by seed over the seeds both
    finished."""
    base = runs[0]
    points = []
    for run in runs:
        entry: dict[str, Any] = {"point": run.name, "values": {k: getattr(run.recipe, k) for k in settings},
                                 "seeds": sorted(run.outcomes), "runs": len(run.outcomes),
                                 "outcomes": dict(sorted(Counter(run.outcomes.values()).items()))}
        for name in ACCURACIES:
            values = {seed: final[name] for seed, final in run.finals.items() if name in final}
            if not values:
                continue
            entry[name] = spread(list(values.values()))
            if run is not base:
                entry[name]["paired_difference"] = paired_difference(
                    values, {seed: final.get(name) for seed, final in base.finals.items()})
        entry["seconds"] = spread(run.seconds)
        points.append(entry)
    return {"selection": selection, "settings": settings, "baseline": base.name, "points": points}
