"""A run planned, not trained: what ``train`` would do with a recipe on this machine and this data
(the device and precision it picks, the images each split gets, its steps, its One Cycle knots,
its FLOPs) and about how long it would take, from a few of its own steps timed. Nothing is
written: a check before committing hours to a run (the seed's recipe takes 5.5 to 8.5 hours on
2 AVX2-only cores, and 68 minutes on 2 with AMX).

The estimate counts every training step at the median of the timed ones, the range test's
sweeps for ``auto`` settings likewise (at their full length: a sweep that diverges stops early; a
range-test step costs what a training step does, benchmarks/lr_find_overhead.py), and one
evaluation pass an epoch at the speed of one timed evaluation batch. A timed step is the run's
own: the next augmented batch of its data, its model, optimizer, precision, compilation and weight
average, at its schedule's LR. The first step (allocation, and compilation with ``compile``) is
timed apart and left out of the median. Not counted: data loading, the final evaluations and the
report; the loop's own bookkeeping, which cost 2% or less of a step on the CPUs measured
(benchmarks/throughput.py).

A sweep's dry run (``dry_run_sweep``) plans each point's run on the data read once, and times one
point of each kind of step (``step_work``): a grid over LRs times one. Its estimate is each run
left at its point's, one run at a time on a CPU (two workers share its cores: on 2 cores they took
0.94 of one worker's time, benchmarks/sweep_workers.py), and with workers on GPUs each run handed,
in the sweep's order, to the first worker free.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .clock import time_left
from .data import LabelledImages
from .device import device_name, eval_batch, resolve_placement, synchronize
from .distributed import init_distributed
from .evaluation import evaluate_recipe
from .host_memory import freed_memory_kept
from .lr_finder import auto_modes, sweep_iterations
from .recipe import Recipe, as_recipe
from .run_setup import RunSetup, setup_run
from .schedule import OneCycle
from .signals import signals_for_tests
from .sweep import SweepFolder, fit_points, make_plan
from .sweep_plan import Plan, Point
from .training import data_folder, load_data

# Steps timed after the first: at least this many, and on a fast device more, until they add up to
# MIN_TIMED_SECONDS: a GPU step of a few milliseconds, timed with a host clock around a sync, says
# little alone; a CPU step of seconds is timed well, and each costs the user that long.
TIMED_STEPS, MIN_TIMED_SECONDS, MAX_TIMED_STEPS = 2, 1.0, 100
# Settings that change what a step computes but not how much: the LRs, momentum, weight decay, label
# smoothing, logit scale, BatchNorm momentum, the biases' LR multiplier and the channel statistics are
# numbers in the same elementwise work beside the convolutions; the seed changes which images a batch
# holds. Those that change how many steps or evaluated images a run has (epochs, holdout,
# train_subset) are counted for each run. Any other setting (batch, precision, compilation,
# augmentation, ghost BatchNorm, the weight average, TTA...) is timed for itself.
SAME_STEP_WORK = frozenset({"epochs", "peak_epoch", "lr_min", "lr_max", "lr_min_div", "momentum", "momentum_at_peak",
                            "weight_decay", "label_smoothing", "logit_scale", "bn_momentum", "bn_bias_lr_mult",
                            "seed", "holdout", "train_subset", "mean", "std"})


def step_work(recipe: Recipe) -> tuple[tuple[str, Any], ...]:
    """What decides how long a step and an evaluation batch of ``recipe`` take: every setting but
    ``SAME_STEP_WORK``'s. Two recipes with the same take the same time, to the elementwise updates."""
    return tuple((f.name, getattr(recipe, f.name)) for f in fields(Recipe) if f.name not in SAME_STEP_WORK)


@dataclass(frozen=True)
class RunPlan:
    """What ``dry_run`` found: the run's recipe as it would record it, where and how it would run,
    its splits and steps, and the timings its estimate comes from."""

    recipe: Recipe
    device: str
    precision: str
    train_images: int          # trained on
    val_images: int            # held out (``holdout``); 0 without
    test_images: int
    steps_per_epoch: int
    range_test_steps: int      # the sweeps' steps for ``auto`` settings, at most; 0 without
    flops_per_image: float     # training FLOPs (forward and backward)
    step_seconds: list[float]  # each timed step's; the first carries allocation, and compilation with ``compile``
    eval_batch_images: int
    eval_batch_seconds: float  # one evaluation batch (with TTA when the recipe evaluates with it each epoch)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.recipe.epochs

    @property
    def cycle(self) -> OneCycle:
        return self.recipe.one_cycle(self.steps_per_epoch)

    @property
    def seconds_a_step(self) -> float:
        """The median of the timed steps, the first left out (as a run's time left is told)."""
        return time_left(self.step_seconds, 1) or 0.0

    @property
    def training_seconds(self) -> float:
        return self.seconds_a_step * self.total_steps

    @property
    def range_test_seconds(self) -> float:
        """The range test's sweeps at their full length, a step as a training step."""
        return self.seconds_a_step * self.range_test_steps

    @property
    def evaluation_seconds(self) -> float:
        """A pass an epoch over the split each epoch is evaluated on (validation with a holdout, else test)."""
        split = self.val_images or self.test_images
        return self.recipe.epochs * split / self.eval_batch_images * self.eval_batch_seconds

    @property
    def estimated_seconds(self) -> float:
        return self.range_test_seconds + self.training_seconds + self.evaluation_seconds


def dry_run(recipe: Recipe | str | Path | None = None, *, data: LabelledImages | None = None,
            data_dir: str | Path | None = None, download: bool = True, progress: bool = False,
            augment_images: int | None = None, find_lr_max: bool = False, find_lr_min: bool = False,
            timed: RunPlan | None = None) -> RunPlan:
    """Set up a run of ``recipe`` (as ``train`` takes it) as ``train`` would (the same checks, the
    data on the device, the model, optimizer and compilation) and time a few of its steps and one
    evaluation batch; train nothing further and write nothing. ``data``, ``data_dir``,
    ``download``, ``augment_images``, ``find_lr_max``, ``find_lr_min``: as for ``train`` (the last
    two count the range test's sweeps; the knots keep the recipe's LRs); ``progress``: the
    download's bar. ``timed``: the plan of a run with the same ``step_work``, whose timings are
    taken instead of timing again (an evaluation batch of another size is timed)."""
    recipe = as_recipe(recipe)
    resolve_placement(recipe)  # a device this machine lacks: refused before loading anything
    if data is None:
        data = load_data(recipe, data_folder(data_dir, None), download, progress, signals_for_tests())
    with freed_memory_kept():  # as the run will train, or its steps are timed slower than they run
        setup = setup_run(recipe, data, init_distributed(recipe.device), augment_images)
        recipe, device = setup.recipe, setup.device
        if timed is not None and step_work(timed.recipe) != step_work(recipe):
            raise ValueError(f"timed: the plan of a run whose steps do other work than {recipe}'s")
        range_test_steps = sum(sweep_iterations(mode, setup.steps_per_epoch)
                               for mode in auto_modes(find_lr_max, find_lr_min))
        eval_images, _ = setup.split(setup.epoch_split)
        batch = min(eval_batch(recipe.eval_batch_size, device), len(eval_images))
        if timed is None:
            steps, flops = time_steps(setup), setup.flops_per_image
        else:
            steps, flops = timed.step_seconds, timed.flops_per_image
        eval_seconds = (timed.eval_batch_seconds if timed is not None and timed.eval_batch_images == batch
                        else time_evaluation(setup, batch))
    return RunPlan(recipe, device_name(device), setup.precision, len(setup.train_images),
                   0 if setup.val_images is None else len(setup.val_images), len(setup.test_images),
                   setup.steps_per_epoch, range_test_steps, flops, steps, batch, eval_seconds)


def time_steps(setup: RunSetup) -> list[float]:
    """The seconds of the run's first steps (``TIMED_STEPS`` after the first, or more on a fast device)."""
    device, recipe = setup.device, setup.recipe
    cycle = recipe.one_cycle(setup.steps_per_epoch)
    total = setup.steps_per_epoch * recipe.epochs
    # Epoch after epoch, should the timed steps outlast a short epoch.
    batches = itertools.chain.from_iterable(setup.epoch() for _ in itertools.count())
    setup.model.train()
    seconds: list[float] = []
    while len(seconds) <= TIMED_STEPS or (sum(seconds[1:]) < MIN_TIMED_SECONDS and len(seconds) <= MAX_TIMED_STEPS):
        step = len(seconds)
        synchronize(device)  # the host clock must not stop before the device's queue is done
        started = time.perf_counter()
        inputs, targets = next(batches)  # the batch's augmentation is part of the step
        setup.step(inputs, targets, cycle.lr(step % total), cycle.momentum(step % total))
        if setup.ema:
            setup.ema.update(setup.model, step % total + 1, total)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def time_evaluation(setup: RunSetup, batch: int) -> float:
    """The seconds of one evaluation batch of ``batch`` images of the split each epoch evaluates."""
    device, recipe = setup.device, setup.recipe
    eval_images, eval_labels = setup.split(setup.epoch_split)
    model = setup.evaluated_model()
    times = []
    for _ in range(2):  # the first pass warms up (and compiles the evaluation's graph)
        synchronize(device)
        started = time.perf_counter()
        evaluate_recipe(model, eval_images[:batch], eval_labels[:batch], recipe, setup.precision, dist=setup.dist,
                        tta=recipe.tta)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times[1]


@dataclass(frozen=True)
class PointPlan:
    """One point of a sweep planned: its runs not yet ended and the plan of its first seed's run."""

    point: Point
    runs: int                          # its runs left: not ended in the sweep's folder (a started one counted whole)
    run: RunPlan | None                # None: no run left, or its runs are ``evaluated_as``'s weights evaluated again
    timed_as: Point | None = None      # the earlier point whose timings it took (the same ``step_work``)
    evaluated_as: Point | None = None  # the point that trains as it does (``Plan.trained_as``)

    @property
    def estimated_seconds(self) -> float:
        """Its runs left at its plan's estimate (evaluating again: not counted, seconds)."""
        return self.runs * self.run.estimated_seconds if self.run else 0.0


@dataclass(frozen=True)
class SweepDryRun:
    """What ``dry_run_sweep`` found: the sweep's plan, each point planned, and how many runs train
    at once."""

    plan: Plan
    points: list[PointPlan]
    at_once: int       # the workers' GPUs (a worker each), else 1: workers on a CPU share its cores

    @property
    def runs(self) -> int:
        """The runs left."""
        return sum(p.runs for p in self.points)

    @property
    def ended(self) -> int:
        """The runs that the sweep's folder holds ended."""
        return len(self.plan.runs()) - self.runs

    @property
    def estimated_seconds(self) -> float:
        """Until the last run left ends: each at its point's estimate, in the sweep's order (seed by
        seed), handed to the first of ``at_once`` workers to be free, as the sweep hands them out
        (so 3 runs on 2 GPUs take two runs' time, not one and a half)."""
        busy = [0.0] * self.at_once
        for k in range(max((p.runs for p in self.points), default=0)):
            for p in self.points:
                if p.run is not None and p.runs > k:
                    busy[busy.index(min(busy))] += p.run.estimated_seconds
        return max(busy)


def dry_run_sweep(recipe: Recipe | str | Path | None = None, vary: Mapping[str, Sequence[Any]] | None = None,
                  seeds: int = 1, *, out: str | Path | None = None, baseline: Mapping[str, Any] | None = None,
                  points: Sequence[Mapping[str, Any]] | None = None, data_dir: str | Path | None = None,
                  download: bool = True, data: LabelledImages | None = None, progress: bool = False,
                  workers: int = 1) -> SweepDryRun:
    """Plan the sweep that ``sweep`` would run with these arguments (refusing what it refuses, the
    folder ``out`` holding another sweep included) without training or writing anything: the data
    read once, each point's run set up as its first seed's, one point of each ``step_work`` timed
    (``dry_run``). The runs that ``out`` holds ended are not counted. ``progress``: a line as each
    point is timed, and the download's bar."""
    base = as_recipe(recipe)
    plan = make_plan(base, vary, seeds, baseline, points, workers)
    device, _ = resolve_placement(base)
    if data is None:
        data = load_data(base, data_folder(data_dir, None), download, progress, signals_for_tests())
    data_settings = fit_points(plan, base, data)
    folder = SweepFolder(out) if out is not None else None
    if folder is not None and not folder.holds(plan, base):
        folder = None  # a new sweep's folder: every run left
    twins = plan.trained_as(base)
    timed: dict[tuple[tuple[str, Any], ...], tuple[Point, RunPlan]] = {}
    planned = []
    for point in plan.points:
        left = sum(folder is None or folder.status(point, seed) in ("started", "new") for seed in plan.seed_range)
        if not left or point in twins:
            planned.append(PointPlan(point, left, None, evaluated_as=twins.get(point)))
            continue
        run_recipe = point.recipe(base, plan.first_seed).replace(**data_settings[point])
        work = step_work(run_recipe)
        earlier = timed.get(work)
        if progress and earlier is None:
            tqdm.write(f"dry run: timing {point.name}")
        run = dry_run(run_recipe, data=data, find_lr_max="lr_max" in point.found,
                      find_lr_min="lr_min" in point.found, timed=earlier[1] if earlier else None)
        timed.setdefault(work, (point, run))
        planned.append(PointPlan(point, left, run, timed_as=earlier[0] if earlier else None))
    at_once = min(workers, torch.cuda.device_count()) if device.type == "cuda" else 1
    return SweepDryRun(plan, planned, at_once)
