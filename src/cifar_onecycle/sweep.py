"""Sweeps: a recipe trained at every point of a grid of settings, or at the points of a list (the
recipe itself first: an ablation, each change alone on top of it), each point over the same seeds,
and the table, statistics and picture that say which value is better and by how much. What a
sweep trains, its ``Plan``, is sweep_plan.py's; this module runs it.

A sweep folder holds sweep_plan.json (the settings varied and their values, or the listed
points; the seeds, the baseline), recipe.toml (the recipe every point starts from), one ordinary
run folder per point and seed (``lr_max=0.1/seed2/``; a list's recipe itself in ``recipe/``) and
the results, rewritten after every run:

    sweep.csv   a row per run that ended: the point, its values (in a list, the recipe's where the
                point keeps them), seed, final validation and test
                accuracy (flip TTA too), the LRs it trained with, seconds, and its outcome: finished,
                diverged (its loss was not finite) or no LR found (``auto`` found nothing); and,
                for a run evaluated with another's weights (below), that run (``weights_from``)
    sweep.json  per point and accuracy: n, mean, standard deviation, standard error; and against the
                baseline point, the difference paired by seed with its standard error
    sweep.png   the selection accuracy against the varied value: a dot per seed, mean and standard error
    sweep_curves.png  each point's training loss and selection split's accuracy per epoch, the mean
                over its finished runs (a line per point: what comparing settings draws by hand)
    sweep.md    the json's numbers as a table, and the pictures: a page to paste into a README

Choose on the validation accuracy (``holdout``), report the test accuracy of what was chosen: the
selection accuracy is the validation one whenever the recipe holds images out.

Runs go seed by seed (the first seed of every point first), so a sweep cut short is balanced. The
same sweep started again skips runs that ended (finished, diverged, no LR found) and resumes a
started one from its checkpoint; another sweep on the same folder is refused.

A point that differs from an earlier one only in what the end's evaluation does (``tta_translate``
without per-epoch TTA) trains exactly as that point: its run is that point's weights evaluated
again (seconds instead of a training run; on a GPU, where two trainings differ in the last digits,
the comparison is then of the evaluation alone), its summary.json naming them (``weights_from``).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT
from .clock import Laps, about_left
from .data import LabelledImages
from .device import resolve_placement
from .errors import DivergenceError, Interrupted, NoLRFound, UserError, as_setting
from .files import MAX_TEXT_BYTES, FolderLock, atomic_write, read_capped, refuse_a_file, writable_folder
from .recipe import DATA_FIELDS, Recipe, as_recipe, load_recipe
from .results import mean_curve, paired_difference, spread
from .run_folder import FAILED, METRICS, RECIPE, SUMMARY, SWEEP_PLAN, RunFolder
from .run_setup import fit_to_data
from .signals import StopSignals, signals_for_tests
from .sweep_plan import EVALUATION_ONLY, KINDS, Plan, Point, format_value
from .sweep_report import MAX_CURVES
from .training import RunOptions, data_folder, load_data, train_folder

TABLE, STATS, PICTURE, CURVES, PAGE = "sweep.csv", "sweep.json", "sweep.png", "sweep_curves.png", "sweep.md"
ACCURACIES = ("final_val_acc", "final_val_acc_tta", "final_test_acc", "final_test_acc_tta")
# A row's numbers and the summary.json keys they come from.
RESULTS = {**{name: name for name in ACCURACIES}, "lr_max_used": "lr_max", "lr_min_used": "lr_min",
           "seconds": "total_seconds"}




@dataclass
class SweepResult:
    """What ``sweep`` returns: a row per run that ended, the statistics per point (as sweep.json
    holds them) and the sweep folder."""

    plan: Plan
    rows: list[dict[str, Any]]
    stats: dict[str, Any]
    path: Path
    remaining: int = 0            # runs that have not ended (a sweep cut short)
    commands: list[str] = field(default_factory=list)


class SweepFolder:
    """A sweep's folder: its plan and base recipe, a run folder per point and seed, the results."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def run(self, point: Point, seed: int) -> RunFolder:
        return RunFolder.inside(self.path, point.name, f"seed{seed}")

    def status(self, point: Point, seed: int) -> str:
        """finished, failed (diverged or no LR found), started (a checkpoint to resume from) or new."""
        run = self.run(point, seed)
        for name, status in ((SUMMARY, "finished"), (FAILED, "failed"), (CHECKPOINT, "started")):
            if run.has(name):
                return status
        return "new"

    def read(self) -> tuple[Plan, Recipe]:
        if not (self.path / SWEEP_PLAN).is_file():  # only a folder given to collect can lack one: open checks first
            raise UserError(f"{as_setting('collect')} {self.path}: not a sweep folder (no {SWEEP_PLAN})")
        text = read_capped(self.path / SWEEP_PLAN, MAX_TEXT_BYTES, SWEEP_PLAN, "is this a sweep folder?")
        try:
            plan = Plan.from_json(text.decode(), str(self.path / SWEEP_PLAN))
        except UnicodeDecodeError:
            raise UserError(f"{self.path / SWEEP_PLAN}: not a sweep plan (not UTF-8)") from None
        base = load_recipe(self.path / "recipe.toml")
        try:
            plan.check(base)
        except UserError as e:  # a plan file someone else wrote: the error names it
            raise UserError(f"{self.path / SWEEP_PLAN}: {e}") from None
        return plan, base

    def open(self, plan: Plan, base: Recipe, held: contextlib.ExitStack | None = None) -> None:
        """Make the folder for ``plan`` on ``base``, or check that it is this sweep's already; with
        ``held``, held there (``FolderLock``) from before its plan is read or written."""
        existed = self.path.is_dir()
        if existed and held is not None:
            held.enter_context(FolderLock(self.path, "out"))
        if self.holds(plan, base):
            return
        writable_folder(self.path)
        if not existed and held is not None:
            held.enter_context(FolderLock(self.path, "out"))
        atomic_write(self.path / "recipe.toml", base.to_toml())
        atomic_write(self.path / SWEEP_PLAN, plan.to_json())

    def holds(self, plan: Plan, base: Recipe) -> bool:
        """Whether the folder holds this sweep already (False: none yet, the folder empty or missing);
        refuses one that holds another sweep, or other files, and a file in its place."""
        refuse_a_file(self.path)
        if (self.path / SWEEP_PLAN).is_file():
            saved_plan, saved_base = self.read()
            if saved_plan != plan:
                what = "its plan (settings varied, values, seeds or baseline) differs"
            elif saved_base != base:  # named, since a default that changed between versions differs too
                name = next(f.name for f in fields(Recipe) if getattr(saved_base, f.name) != getattr(base, f.name))
                what = (f"its recipe differs in {as_setting(name)}: {getattr(saved_base, name)!r} there, "
                        f"{getattr(base, name)!r} here")
            else:
                return True
            raise UserError(f"{as_setting('out')} {self.path}: holds another sweep ({what}); choose another folder, "
                            f"or run the same sweep to go on with it")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise UserError(f"{as_setting('out')} {self.path}: is not empty and holds no sweep; choose another folder")
        return False

    def rows(self, plan: Plan, base: Recipe) -> tuple[list[dict[str, Any]], int]:
        """(a row per run that ended, in the points' order, seed within point, its values those of
        every setting the sweep changes, the recipe's where the point keeps them; the runs still to do)."""
        rows, remaining = [], 0
        for point in plan.points:
            for seed in plan.seed_range:
                status = self.status(point, seed)
                if status not in ("finished", "failed"):
                    remaining += 1
                    continue
                run = self.run(point, seed)
                values = {k: dict(point.values).get(k, getattr(base, k)) for k in plan.settings}
                row: dict[str, Any] = {"point": point.name, "values": values, "seed": seed,
                                       "outcome": "finished" if status == "finished" else run.read_failed()[0]}
                summary = run.read_summary() if status == "finished" else {}
                for name, key in RESULTS.items():
                    value = summary.get(key)
                    row[name] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
                row["weights_from"] = summary.get("weights_from")
                rows.append(row)
        return rows, remaining

    def mean_curves(self, plan: Plan, rows: list[dict[str, Any]],
                    split: str) -> dict[str, list[tuple[int, float, float]]]:
        """Per point (the first ``MAX_CURVES`` with a finished run it trained itself), each epoch's
        training loss and accuracy on ``split`` (the selection's: ``selection_split``), the mean over
        those runs: (epoch, loss, accuracy) rows. A run evaluated with another's weights has that
        run's curve and is left out; so is one without metrics.csv. A point whose epochs were
        evaluated on the other split (``holdout`` varied to or from 0) keeps its loss, and its
        accuracy is NaN: those accuracies are not the ones compared."""
        trained = {(r["point"], r["seed"]) for r in rows if r["outcome"] == "finished" and not r["weights_from"]}
        curves: dict[str, list[tuple[int, float, float]]] = {}
        for point in plan.points:
            if len(curves) == MAX_CURVES:
                break
            runs = [self.run(point, seed) for seed in plan.seed_range if (point.name, seed) in trained]
            histories = [run.read_metrics() for run in runs if run.has(METRICS)]
            if histories:
                curve = mean_curve(histories)
                if any(m.split != split for history in histories for m in history):
                    curve = [(epoch, loss, math.nan) for epoch, loss, _ in curve]
                curves[point.name] = curve
        return curves

    def write_results(self, plan: Plan, base: Recipe) -> SweepResult:
        """sweep.csv, sweep.json, sweep.png, sweep_curves.png and sweep.md from the run folders as they
        are now."""
        rows, remaining = self.rows(plan, base)
        # read before any write: a damaged metrics.csv leaves all as it was
        curves = self.mean_curves(plan, rows, selection_split(base))
        stats = sweep_stats(plan, rows, selection_accuracy(base), remaining)
        atomic_write(self.path / TABLE, sweep_csv(plan, rows))
        atomic_write(self.path / STATS, json.dumps(stats, indent=1) + "\n")
        from .report import save_png
        from .sweep_report import plot_sweep, plot_sweep_curves, sweep_markdown

        save_png(plot_sweep(plan, rows, stats), self.path / PICTURE)
        save_png(plot_sweep_curves(plan, curves, stats), self.path / CURVES)
        atomic_write(self.path / PAGE, sweep_markdown(stats))
        return SweepResult(plan, rows, stats, self.path, remaining)


def selection_split(recipe: Recipe) -> str:
    """The split a sweep chooses on: the validation split ("val") when the recipe holds images out,
    else the test set ("test")."""
    return "val" if recipe.holdout else "test"


def selection_accuracy(recipe: Recipe) -> str:
    """The accuracy a sweep chooses on (``selection_split``'s, at the run's end)."""
    return f"final_{selection_split(recipe)}_acc"


def sweep_csv(plan: Plan, rows: list[dict[str, Any]]) -> str:
    names = ["point", *plan.settings, "seed", *RESULTS, "outcome", "weights_from"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: format_value(v) for k, v in row["values"].items()}
        out.update(point=row["point"], seed=row["seed"], outcome=row["outcome"], weights_from=row["weights_from"] or "")
        out.update({name: "" if row[name] is None else f"{row[name]:.6g}" for name in RESULTS})
        writer.writerow(out)
    return buf.getvalue()


def sweep_stats(plan: Plan, rows: list[dict[str, Any]], selection: str, remaining: int) -> dict[str, Any]:
    """sweep.json: per point, each accuracy's ``spread`` over its finished runs (runs that failed
    are counted apart, never averaged in), and the difference from the baseline point paired by
    seed (over the seeds both finished); the LRs ``auto`` found, and the points whose weights a
    point's runs evaluated again."""
    baseline = plan.baseline_point
    by_point: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_point.setdefault(row["point"], {})[row["seed"]] = row
    points = []
    for point in plan.points:
        runs = by_point.get(point.name, {})
        finished = {s: r for s, r in runs.items() if r["outcome"] == "finished"}
        entry: dict[str, Any] = {"point": point.name, "values": dict(point.values), "runs": len(runs),
                                 "failed": len(runs) - len(finished),
                                 "outcomes": {o: sum(r["outcome"] == o for r in runs.values())
                                              for o in sorted({r["outcome"] for r in runs.values()})}}
        for name in ACCURACIES:
            values = [r[name] for r in finished.values() if r.get(name) is not None]
            if not values:
                continue
            entry[name] = spread(values)
            if baseline is not None and point != baseline:
                base_runs = by_point.get(baseline.name, {})
                entry[name]["paired_difference"] = paired_difference(
                    {s: r.get(name) for s, r in finished.items()}, {s: r.get(name) for s, r in base_runs.items()})
        if point.found:  # the LRs the range test found, seed by seed
            entry["found"] = {k: [r[k + "_used"] for r in finished.values()] for k in point.found}
        twins = sorted({r["weights_from"].rsplit("/", 1)[0] for r in runs.values() if r.get("weights_from")})
        if twins:  # its runs are these points' weights evaluated again (``evaluate_as``)
            entry["weights_from"] = twins
        points.append(entry)
    return {"selection": selection, "vary": plan.vary, "settings": plan.settings, "seeds": list(plan.seed_range),
            "baseline": baseline.name if baseline else None, "remaining_runs": remaining, "points": points}


def train_command(folder: SweepFolder, point: Point, seed: int, options: RunOptions) -> list[str]:
    """The ``cifar-onecycle train`` arguments of one run of the sweep (its resume when it has a
    checkpoint): run as printed, they make the same run folder that ``sweep`` would."""
    run = folder.run(point, seed)
    where = os.path.abspath(run.path)  # a scheduler's job may start in another folder
    if run.has(CHECKPOINT):
        args = ["train", "--resume", where]
    else:
        args = ["train", "--recipe", os.path.abspath(folder.path / "recipe.toml"), *point.flags(), "--seed",
                str(seed), "--out", where, "--overwrite"]
    if options.data_dir:
        args += ["--data-dir", str(options.data_dir)]
    args += [*([] if options.download else ["--no-download"]), *([] if options.report else ["--no-report"]),
             *([] if options.checkpoints else ["--no-checkpoint"]),
             *(["--keep-checkpoint"] if options.keep_checkpoint else []),
             *(["--tensorboard"] if options.tensorboard else [])]
    return args


def make_plan(base: Recipe, vary: Mapping[str, Sequence[Any]] | None, seeds: int,
              baseline: Mapping[str, Any] | None, points: Sequence[Mapping[str, Any]] | None, workers: int) -> Plan:
    """The checked plan of ``sweep``'s arguments (its baseline by default the recipe's own values of
    the varied settings, when they are a point of the grid); fewer than one worker refused."""
    if workers < 1:
        raise UserError(f"{as_setting('workers')} {workers}: give at least 1")
    vary_lists = {k: list(v) for k, v in (vary or {}).items()}
    own = {k: getattr(base, k) for k in vary_lists if k in KINDS}
    if baseline is None and all(own[k] in vary_lists[k] for k in own) and own and points is None:
        baseline = own
    plan = Plan(vary_lists, base.seed, seeds, dict(baseline) if baseline is not None else None,
                None if points is None else [dict(p) for p in points])
    plan.check(base)
    return plan


def fit_points(plan: Plan, base: Recipe, data: LabelledImages) -> dict[Point, dict[str, Any]]:
    """Each point's data settings (classes, mean, std), fitted once for each split the plan holds;
    a holdout or subset the data cannot give is refused."""
    by_split: dict[tuple[int, int], Recipe] = {}
    settings: dict[Point, dict[str, Any]] = {}
    for point in plan.points:
        recipe = point.recipe(base, plan.first_seed)
        split = (recipe.holdout, recipe.train_subset)
        if split not in by_split:
            by_split[split] = fit_to_data(recipe, data)
        settings[point] = {k: getattr(by_split[split], k) for k in DATA_FIELDS}
    return settings


def sweep(recipe: Recipe | str | Path | None = None, vary: Mapping[str, Sequence[Any]] | None = None, seeds: int = 1, *,
          out: str | Path, baseline: Mapping[str, Any] | None = None, data_dir: str | Path | None = None,
          download: bool = True, data: LabelledImages | None = None, progress: bool = True, workers: int = 1,
          report: bool = False, checkpoints: bool = True, keep_checkpoint: bool = False, tensorboard: bool = False,
          print_commands: bool = False, points: Sequence[Mapping[str, Any]] | None = None) -> SweepResult:
    """Train ``recipe`` (as ``train`` takes it) at every point of the grid ``vary`` ({setting: values};
    ``"auto"`` for lr_max or lr_min: the range test's value, found in each run), or instead at the
    recipe itself and each of ``points`` (a list of {setting: value}, the changes each makes to the
    recipe), with seeds ``recipe.seed`` .. ``recipe.seed + seeds - 1``, each run an ordinary run
    folder under ``out``; returns the table.

    ``baseline``: the point the others are compared with, paired by seed (default: the recipe's
    own values of the varied settings, when they are a point of the grid; with ``points``, the
    recipe itself). ``workers``: runs at once, each a ``cifar-onecycle train`` process (on a
    machine with GPUs, worker k uses GPU k modulo their number); 1 trains in this process.
    ``print_commands``: make the folder and return, in ``commands``, one ``cifar-onecycle train``
    command per remaining run instead of training them (for a scheduler); ``collect`` gathers their
    results. ``report``, ``checkpoints``, ``keep_checkpoint``, ``tensorboard``: as for ``train``
    (by default a finished run keeps its weights, not its checkpoint). The same call again goes on
    where a sweep stopped.
    """
    base = as_recipe(recipe)
    plan = make_plan(base, vary, seeds, baseline, points, workers)
    resolve_placement(base)  # a device this machine lacks: refused before loading anything
    data_dir = data_folder(data_dir, data)
    data_settings: dict[Point, dict[str, Any]] = {}
    if not print_commands:  # with workers the data is read here too, once, to check the grid against it
        if data is None:
            data = load_data(base, data_dir, download, progress, signals_for_tests())
        data_settings = fit_points(plan, base, data)  # before any folder
    folder = SweepFolder(out)
    options = RunOptions(data_dir=data_dir, download=download, progress=progress, report=report,
                         checkpoints=checkpoints, keep_checkpoint=keep_checkpoint, tensorboard=tensorboard)
    with contextlib.ExitStack() as held:  # the sweep's folder, held until its results are written
        folder.open(plan, base, held)
        todo = [(seed, point) for seed, point in plan.runs() if folder.status(point, seed) in ("started", "new")]
        if print_commands:  # every run as a training: a job array's runs need not wait for one another
            result = folder.write_results(plan, base)
            result.commands = ["cifar-onecycle " + shlex.join(train_command(folder, point, seed, options))
                               for seed, point in todo]
            return result
        assert data is not None
        return train_sweep(folder, plan, base, todo, data, data_settings, options, workers)


def train_sweep(folder: SweepFolder, plan: Plan, base: Recipe, todo: list[tuple[int, Point]], data: LabelledImages,
                data_settings: dict[Point, dict[str, Any]], options: RunOptions, workers: int) -> SweepResult:
    """Train (or evaluate again) the runs ``todo`` of the sweep in ``folder``, seed by seed, with
    ``workers`` processes at once (1: in this process); the results rewritten after every run."""
    progress, report = options.progress, options.report
    twins = plan.trained_as(base)

    def evaluated_again(seed: int, point: Point) -> bool:
        """Whether ``point``'s run of ``seed`` was made from its twin's (``evaluate_as``), shown and tabled."""
        recipe = point.recipe(base, seed).replace(**data_settings[point])
        try:
            evaluated = evaluate_as(folder, point, twins[point], seed, recipe, data, report)
        except KeyboardInterrupt:  # a training run stops cleanly on its own; this pass has no stop of its own
            raise Interrupted(f"sweep {folder.path} stopped while {point.name} seed {seed} was being evaluated "
                              f"with {twins[point].name}'s weights; run the same sweep again to go on") from None
        if evaluated is not None:
            if progress:
                tqdm.write(f"sweep: {point.name} seed {seed}: {evaluated}")
            folder.write_results(plan, base)
        return evaluated is not None

    if workers == 1:
        run_laps = Laps()  # of the runs trained: the time left shown
        trainings, trained = sum(point not in twins for _, point in todo), 0
        for seed, point in todo:
            run = folder.run(point, seed)
            recipe = point.recipe(base, seed).replace(**data_settings[point])
            if point in twins:
                if evaluated_again(seed, point):
                    run_laps.restart()
                    continue
                trainings += 1  # its twin's run is not this sweep's: it trains
            trained += 1
            if progress:
                left = about_left(run_laps.seconds, trainings - trained + 1)
                tqdm.write(f"sweep: {point.name} seed {seed} ({trained} of {trainings} left to train"
                           + (f"; {left})" if left else ")"))
            try:
                train_folder(run.path, recipe, data, replace(
                    options, find_lr_max="lr_max" in point.found, find_lr_min="lr_min" in point.found))
            except (DivergenceError, NoLRFound) as e:  # train recorded it in the run folder; the sweep goes on
                if progress:
                    tqdm.write(f"sweep: {point.name} seed {seed}: {e}")
            except Interrupted as e:
                folder.write_results(plan, base)
                raise Interrupted(f"{e}; or, to go on with the whole sweep, run the same sweep again") from None
            folder.write_results(plan, base)
            run_laps.lap()
    else:  # the twins' runs first, by the workers; then their weights evaluated again, here
        run_workers(folder, [(seed, point) for seed, point in todo if point not in twins], workers, options, progress,
                    lambda: folder.write_results(plan, base))
        for seed, point in todo:
            if point in twins and not evaluated_again(seed, point):
                raise UserError(f"sweep {folder.path}: {point.name} seed {seed} trains as {twins[point].name}, "
                                f"whose run there did not end as this sweep's; run the sweep with "
                                f"{as_setting('workers')} 1")
    return folder.write_results(plan, base)


def evaluate_as(folder: SweepFolder, point: Point, twin: Point, seed: int, recipe: Recipe, data: LabelledImages,
                report: bool) -> str | None:
    """Make ``point``'s run of ``seed`` (``recipe``) from ``twin``'s, which trained the same
    (``Plan.trained_as``): the twin's metrics and weights, and its summary with the TTA accuracies
    of ``recipe``'s evaluation, the seconds they took and where the weights come from (a twin that
    failed fails the same way); returns what was done, in words. None, with nothing written, unless
    the twin's run ended with this very recipe but for its ``EVALUATION_ONLY`` settings: then it
    must be trained."""
    from .checkpoint import load_weights
    from .evaluation import evaluate_recipe
    from .run_setup import split_images

    started = time.perf_counter()
    source, run = folder.run(twin, seed), folder.run(point, seed)
    status = folder.status(twin, seed)
    if status not in ("finished", "failed") or not source.has(RECIPE):
        return None
    trained = source.read_recipe()
    if trained != recipe.replace(**{k: getattr(trained, k) for k in EVALUATION_ONLY}):
        return None
    if status == "failed":
        reason, message = source.read_failed()
        RunFolder.create(run.path, overwrite=True).write_failed(reason, f"it trains as {twin.name}: {message}")
        return f"{reason}: it trains as {twin.name}, which did"
    model, _ = load_weights(source.path)
    device, precision = resolve_placement(recipe)
    # torch's stubs leave out Module.to's memory_format, which it takes at run time
    model = model.to(device, memory_format=recipe.memory_format)  # type: ignore[call-overload]
    summary, history = source.read_summary(), source.read_metrics()
    probabilities = None  # the report's predictions, from the test set's pass
    for split in ("val", "test") if recipe.holdout else ("test",):
        images, labels = split_images(recipe, data, split)
        scores = evaluate_recipe(model, images.to(device), labels.to(device), recipe, precision, tta=True,
                                 keep_probabilities=report and split == "test")
        summary[f"final_{split}_acc_tta"], probabilities = scores.tta_acc, scores.probabilities
    run = RunFolder.create(run.path, overwrite=True)
    run.write_recipe(recipe)
    run.write_metrics(history)
    run.save_weights(model, recipe)
    summary |= {"total_seconds": round(time.perf_counter() - started, 2), "weights_from": f"{twin.name}/seed{seed}"}
    if report:
        from .report import write_report

        summary = write_report(run.path, model, recipe, history, summary, data.test_images.to(device),
                               data.test_labels.to(device), data.train_images[:20], summary["steps_per_epoch"],
                               precision, probabilities)
    run.write_summary(summary)  # last: until it is written the run has not ended
    return f"trains as {twin.name}: its weights evaluated again"


def collect(out: str | Path) -> SweepResult:
    """sweep.csv, sweep.json and the pictures of the sweep folder ``out`` from its run folders as they
    are (runs trained elsewhere, from ``print_commands``)."""
    folder = SweepFolder(out)
    with FolderLock(folder.path, "collect"):  # a sweep running there writes the same files
        plan, base = folder.read()
        return folder.write_results(plan, base)


def worker_environment(slot: int, workers: int) -> dict[str, str]:
    """A worker's environment: its GPU (slot modulo the GPUs there are), or on a CPU its share of the
    cores (two processes each with every core run far slower than one: OpenMP oversubscribed)."""
    import torch

    env = dict(os.environ)
    gpus = torch.cuda.device_count()
    if gpus:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ids[slot % len(ids)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    return env


def run_workers(folder: SweepFolder, todo: list[tuple[int, Point]], workers: int, options: RunOptions,
                progress: bool, after_each: Any) -> None:
    """Train ``todo`` as ``cifar-onecycle train`` processes, ``workers`` at once. A stop signal is
    passed on to every running process (each saves its checkpoint), then the sweep stops; a run that
    fails for another reason stops the launching of new ones and is reported."""
    queue = list(todo)
    # slot: (process, its stderr, seed, point, when it started)
    running: dict[int, tuple[subprocess.Popen, Any, int, Point, float]] = {}
    run_seconds: list[float] = []  # of the runs that finished here: the time left shown
    stopping: set[subprocess.Popen] = set()  # passed the stop signal once: a second would skip the checkpoint
    failure: str | None = None
    with StopSignals() as stop:
        try:
            while queue or running:
                while queue and len(running) < workers and not stop() and failure is None:
                    seed, point = queue.pop(0)
                    slot = min(set(range(workers)) - set(running))
                    err = tempfile.TemporaryFile()  # noqa: SIM115 - closed once its process has ended
                    command = [sys.executable, "-m", "cifar_onecycle",
                               *train_command(folder, point, seed, options), "--quiet"]
                    # A session of its own: a terminal's Ctrl-C reaches this process alone, which passes
                    # one SIGINT on (two would stop a run before its checkpoint).
                    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err,
                                               env=worker_environment(slot, workers), start_new_session=True)
                    running[slot] = (process, err, seed, point, time.perf_counter())
                    if progress:
                        left = about_left(run_seconds, len(queue) + len(running), workers)
                        tqdm.write(f"sweep: {point.name} seed {seed} started (worker {slot})"
                                   + (f"; {left}" if left else ""))
                if not queue or len(running) >= workers or stop() or failure is not None:
                    if stop():
                        for process, *_ in running.values():
                            if process not in stopping:
                                pass_on(process, stop.received)
                                stopping.add(process)
                    time.sleep(0.2)
                for slot, (process, err, seed, point, started) in list(running.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    del running[slot]
                    err.seek(0)
                    lines = err.read()[-4000:].decode(errors="replace").strip().splitlines()
                    err.close()
                    last = lines[-1] if lines else f"exit code {code}"
                    status = folder.status(point, seed)  # a run that failed (diverged, no LR found) says so
                    if code == 0:
                        run_seconds.append(time.perf_counter() - started)
                    if status in ("finished", "failed") or code == Interrupted.exit_code and stop():
                        if progress:
                            tqdm.write(f"sweep: {point.name} seed {seed}: " + ("finished" if code == 0 else last))
                    elif failure is None:
                        failure = f"{point.name} seed {seed} failed (exit code {code}): {last}"
                    after_each()
                if not running and (stop() or failure is not None):
                    break
        except KeyboardInterrupt:  # a second signal: stop every run at once
            for process, *_ in running.values():
                pass_on(process, "SIGINT")
            raise
    if stop():
        saved = ("each run that had started saved its checkpoint" if options.checkpoints else
                 "checkpoints are off: each run that had started will start again")
        raise Interrupted(f"sweep {folder.path} stopped by {stop.received}; {saved}; run the same sweep again to go on")
    if failure is not None:
        raise UserError(f"sweep {folder.path}: {failure}")


# On Windows the workers share this process's console (start_new_session is POSIX's), which gives
# each its own Ctrl-C, and Popen.send_signal there refuses SIGINT (a ValueError) and makes SIGTERM a
# TerminateProcess, a kill before the checkpoint: only on POSIX is a stop passed on.
PASS_SIGNALS_ON = os.name != "nt"


def pass_on(process: subprocess.Popen, name: str | None) -> None:
    """Send a running worker ``process`` the stop signal ``name`` (default SIGINT) this process got."""
    import signal

    if PASS_SIGNALS_ON and process.poll() is None:
        process.send_signal(int(signal.Signals[name or "SIGINT"]))
