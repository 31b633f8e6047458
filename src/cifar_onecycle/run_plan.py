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
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from .clock import time_left
from .data import LabelledImages
from .device import device_name, eval_batch, resolve_placement, synchronize
from .distributed import init_distributed
from .evaluation import evaluate_recipe
from .lr_finder import auto_modes, sweep_iterations
from .recipe import Recipe
from .run_setup import setup_run
from .schedule import OneCycle
from .signals import signals_for_tests
from .training import data_folder, load_data

# Steps timed after the first: at least this many, and on a fast device more, until they add up to
# MIN_TIMED_SECONDS: a GPU step of a few milliseconds, timed with a host clock around a sync, says
# little alone; a CPU step of seconds is timed well, and each costs the user that long.
TIMED_STEPS, MIN_TIMED_SECONDS, MAX_TIMED_STEPS = 2, 1.0, 100


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
    def training_seconds(self) -> float:
        """Every step at the median of the timed ones, the first left out (as a run's time left is told)."""
        return time_left(self.step_seconds, self.total_steps) or 0.0

    @property
    def range_test_seconds(self) -> float:
        """The range test's sweeps at their full length, a step at the training steps' median."""
        return time_left(self.step_seconds, self.range_test_steps) or 0.0

    @property
    def evaluation_seconds(self) -> float:
        """A pass an epoch over the split each epoch is evaluated on (validation with a holdout, else test)."""
        split = self.val_images or self.test_images
        return self.recipe.epochs * split / self.eval_batch_images * self.eval_batch_seconds

    @property
    def estimated_seconds(self) -> float:
        return self.range_test_seconds + self.training_seconds + self.evaluation_seconds


def dry_run(recipe: Recipe | None = None, *, data: LabelledImages | None = None,
            data_dir: str | Path | None = None, download: bool = True, progress: bool = False,
            augment_images: int | None = None, find_lr_max: bool = False, find_lr_min: bool = False) -> RunPlan:
    """Set up a run of ``recipe`` as ``train`` would (the same checks, the data on the device, the
    model, optimizer and compilation) and time a few of its steps and one evaluation batch; train
    nothing further and write nothing. ``data``, ``data_dir``, ``download``, ``augment_images``,
    ``find_lr_max``, ``find_lr_min``: as for ``train`` (the last two count the range test's sweeps;
    the knots keep the recipe's LRs); ``progress``: the download's bar."""
    recipe = recipe or Recipe()
    resolve_placement(recipe)  # a device this machine lacks: refused before loading anything
    if data is None:
        data = load_data(recipe, data_folder(data_dir, None), download, progress, signals_for_tests())
    setup = setup_run(recipe, data, init_distributed(recipe.device), augment_images)
    recipe, device = setup.recipe, setup.device
    cycle = recipe.one_cycle(setup.steps_per_epoch)
    total = setup.steps_per_epoch * recipe.epochs
    range_test_steps = sum(sweep_iterations(mode, setup.steps_per_epoch)
                           for mode in auto_modes(find_lr_max, find_lr_min))
    # Epoch after epoch, should the timed steps outlast a short epoch.
    batches = itertools.chain.from_iterable(setup.epoch() for _ in itertools.count())
    setup.model.train()
    seconds: list[float] = []
    for step in itertools.count():
        timed = seconds[1:]
        if len(timed) >= TIMED_STEPS and (sum(timed) >= MIN_TIMED_SECONDS or len(timed) >= MAX_TIMED_STEPS):
            break
        synchronize(device)  # the host clock must not stop before the device's queue is done
        started = time.perf_counter()
        inputs, targets = next(batches)  # the batch's augmentation is part of the step
        setup.step(inputs, targets, cycle.lr(step % total), cycle.momentum(step % total))
        if setup.ema:
            setup.ema.update(setup.model, step % total + 1, total)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    eval_images, eval_labels = setup.split(setup.epoch_split)
    batch = min(eval_batch(recipe.eval_batch_size, device), len(eval_images))
    model = setup.evaluated_model()
    times = []
    for _ in range(2):  # the first pass warms up (and compiles the evaluation's graph)
        synchronize(device)
        started = time.perf_counter()
        evaluate_recipe(model, eval_images[:batch], eval_labels[:batch], recipe, setup.precision, dist=setup.dist,
                        tta=recipe.tta)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return RunPlan(recipe, device_name(device), setup.precision, len(setup.train_images),
                  0 if setup.val_images is None else len(setup.val_images), len(setup.test_images),
                  setup.steps_per_epoch, range_test_steps, setup.flops_per_image, seconds, batch, times[1])
