"""The training run. ``train`` reads top to bottom: start the run (or take it up from its checkpoint),
then for each epoch a shuffled pass of augmented batches with the One Cycle LR set before every step,
an evaluation, and the run folder brought up to date; then the summary, the weights and the report.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .clock import Laps, about_left
from .data import LabelledImages, recorded_data_dir
from .datasets import load_dataset
from .device import resolve_placement, sync_every, synchronize
from .distributed import Dist, all_reduce_sum, init_distributed, wait_for_ranks
from .errors import DivergenceError, Interrupted, NoLRFound, UserError, as_setting, one_line
from .evaluation import EvaluationStopped
from .files import FolderLock
from .host_memory import freed_memory_kept
from .lr_finder import find_lr_bounds
from .recipe import DATA_FIELDS, Recipe, as_recipe
from .report import write_report
from .results import EpochMetrics, TrainResult, format_epoch, git_commit, run_summary
from .run_folder import CHECKPOINT, SUMMARY, TENSORBOARD, RunFolder
from .run_setup import RunSetup, setup_run
from .schedule import OneCycle
from .signals import StopSignals, TestSignals, interrupted, send_test_signals, signals_for_tests
from .state import TrainState


@dataclass(frozen=True)
class RunOptions:
    """How a run is carried out, beside what it computes (the recipe): where its data and folder
    are, what it shows and writes. ``train``'s keyword arguments, documented there."""

    data_dir: str | Path | None = None
    download: bool = True
    out: str | Path | None = None
    overwrite: bool = False
    resume: str | Path | None = None
    progress: bool = True
    report: bool = True
    tensorboard: bool = False
    checkpoints: bool = True
    find_lr_max: bool = False
    find_lr_min: bool = False
    augment_images: int | None = None
    keep_checkpoint: bool = False


def train(recipe: Recipe | str | Path | None = None, *, data: LabelledImages | None = None,
          data_dir: str | Path | None = None, download: bool = True, out: str | Path | None = None,
          overwrite: bool = False, resume: str | Path | None = None, progress: bool = True, report: bool = True,
          tensorboard: bool = False, checkpoints: bool = True, find_lr_max: bool = False, find_lr_min: bool = False,
          augment_images: int | None = None, keep_checkpoint: bool = False) -> TrainResult:
    """Train the seed's ResNet with the One Cycle policy and return its history and model.

    ``recipe``: a Recipe, a shipped recipe's name (``"best"``) or a recipe TOML file (``as_recipe``);
    None: the seed's, or when resuming the run's own.
    ``data``: an already loaded data set (else it is read from ``data_dir``, default ./data or, when
    resuming, the run's own; given both, ``data_dir`` says where ``data`` came from). ``out``: a run
    folder for recipe.toml, metrics.csv, summary.json, the weights and a checkpoint after every epoch
    (and on SIGINT/SIGTERM); none when ``None``.
    ``progress``: a progress bar and a line per epoch. ``find_lr_max`` / ``find_lr_min``: run the
    LR range test first and use its LRMAX / LRMIN suggestion (``lr_finder.find_lr_bounds``).
    ``resume``: a run folder whose checkpoint to continue, with its own recipe. ``report``: write
    the pictures and report.md into the run folder at the end. ``tensorboard``: also log each
    epoch's scalars to RUN_DIR/tensorboard (needs the ``tensorboard`` extra). ``checkpoints``: write
    checkpoint.pt after every epoch and on a stop signal (off: a run that only measures, which
    cannot be resumed). ``keep_checkpoint``: leave checkpoint.pt in the folder when the run ends
    (by default removed then, once summary.json is written: it serves to resume an unfinished run
    and is two to three times the size of the weights). ``augment_images``: how many images a GPU
    augments at once (None: the device's policy, ``device.augment_at_once``; 0: one batch at a
    time); the images are the same.
    """
    recipe = None if recipe is None else as_recipe(recipe)  # None: the resumed run's own, or the seed's
    options = RunOptions(data_dir, download, out, overwrite, resume, progress, report, tensorboard, checkpoints,
                         find_lr_max, find_lr_min, augment_images, keep_checkpoint)
    started = time.perf_counter()  # the run's time counts its data loading and any range test
    commit = git_commit()  # now: the tree may move on while a long run trains
    dist = init_distributed(run_device(recipe, resume))
    progress = progress and dist.main  # under torchrun only rank 0 shows progress and writes files
    test_signals = signals_for_tests()
    board_class = tensorboard_writer(out or resume) if tensorboard and dist.main else None  # refused before any work
    with contextlib.ExitStack() as held:  # the run folder, held from its creation or resume to the end
        held.enter_context(freed_memory_kept())
        setup, state, folder = start_run(recipe, options, data, dist, test_signals, started, held)
        recipe = setup.recipe
        board = board_class(log_dir=str(folder.path / TENSORBOARD)) if board_class and folder else None
        checkpoint_folder = folder if checkpoints else None
        given_folder = out or resume
        resume_from = Path(given_folder) if checkpoints and given_folder else None  # for the stop message
        cycle = recipe.one_cycle(setup.steps_per_epoch)
        epoch_laps = Laps()  # this process's epochs on the wall clock, evaluation included: the time left shown
        with StopSignals(active=folder is not None or dist.world > 1) as stop:
            for epoch in range(state.epoch + 1, recipe.epochs + 1):
                try:
                    stopping = train_epoch(setup, state, cycle, stop, test_signals, progress,
                                           run_left_in_bar=not epoch_laps.seconds)
                except DivergenceError as e:  # recorded, so that a sweep need not train it again to learn it
                    if folder:
                        folder.write_failed("diverged", str(e))
                    raise
                if stopping and state.batch < setup.steps_per_epoch:
                    save_checkpoint(checkpoint_folder, state, setup)
                    raise stopped(setup, stop, f"in epoch {epoch} after step {state.steps_done(setup)}", resume_from)
                send_test_signals(test_signals, f"eval{epoch}")
                try:  # a stop that came with the epoch's last step lets its evaluation finish
                    metrics = evaluate_epoch(setup, state, cycle, stop=None if stopping else stop)
                except EvaluationStopped:
                    save_checkpoint(checkpoint_folder, state, setup)
                    raise stopped(setup, stop, f"during the evaluation of epoch {epoch}", resume_from) from None
                state.end_epoch(metrics)
                record_epoch(state.history, folder, board, progress, recipe.epochs,
                             about_left(epoch_laps.lap(), recipe.epochs - epoch))
                save_checkpoint(checkpoint_folder, state, setup)
                if stopping and epoch < recipe.epochs:
                    raise stopped(setup, stop, f"after epoch {epoch}", resume_from)
        if board:
            board.close()
        summary = finish_run(setup, state, folder, commit, report)
        if folder and not keep_checkpoint:  # after the summary: a kill between the two leaves a finished run
            folder.remove_checkpoint()
    return TrainResult(recipe, state.history, summary, setup.delivered_model, folder.path if folder else None)


def train_folder(run_dir: str | Path | None, recipe: Recipe, data: LabelledImages | None,
                 options: RunOptions) -> TrainResult:
    """Take the run folder ``run_dir`` to its end, for callers that train many (several seeds, a
    sweep): resumed from its checkpoint when it has one, else ``recipe`` started there afresh (a
    folder that a run killed before its first checkpoint left is started again). None: a run
    without a folder. A finished run is the caller's to read back (``RunFolder.read_summary``)."""
    if run_dir is not None and RunFolder(run_dir).has(CHECKPOINT):
        return train(data=data, **asdict(replace(options, out=None, overwrite=False, resume=run_dir)))
    return train(recipe, data=data, **asdict(replace(options, out=run_dir, overwrite=True, resume=None)))


def start_run(recipe: Recipe | None, options: RunOptions, data: LabelledImages | None, dist: Dist,
              test_signals: TestSignals, started: float,
              held: contextlib.ExitStack) -> tuple[RunSetup, TrainState, RunFolder | None]:
    """The run's setup, its state (restored from the checkpoint when resuming) and its folder (rank
    0's only, held in ``held`` from before its first read or write). Nothing is written before the
    data and the recipe pass every check: a bad input leaves no half-made run folder."""
    progress = options.progress and dist.main
    folder: RunFolder | None
    if options.resume is not None:
        folder = RunFolder(options.resume)
        if dist.main:  # before its checkpoint is read: another process may be writing it
            held.enter_context(FolderLock(folder.path, "resume"))
        folder.check_usable(resume=True)
        # summary.json is written once, as a run ends: whatever its checkpoint (removed then, or kept),
        # nothing is left to train and no setting given here changes that. A run killed between its
        # last checkpoint and its summary has none, and the resume finishes it.
        if folder.has(SUMMARY):
            raise UserError(f"{as_setting('resume')} {folder.path}: this run already finished (its summary.json "
                            f"says how it did)")
        checkpoint, saved = folder.load_checkpoint()
        with damaged_checkpoint(folder):
            TrainState.check_checkpoint(checkpoint, saved.epochs)
        if dist.main:
            folder.remove_interrupted_writes()
        if recipe is not None:
            check_same_recipe(recipe, saved, folder.path)
        resolve_placement(saved)  # a device this machine lacks: refused before loading anything
        data_dir, download = options.data_dir, options.download
        if data_dir is None and data is None and checkpoint.get("data_dir") is not None:
            data_dir, download = recorded_data_dir(checkpoint["data_dir"], folder.path / CHECKPOINT), False
        data_dir = data_folder(data_dir, data)
        data = data if data is not None else load_data(saved, data_dir, download, progress, test_signals)
        setup = setup_run(saved, data, dist, options.augment_images)
        with damaged_checkpoint(folder):
            state = TrainState.from_checkpoint(checkpoint, setup, started)
        state.data_dir = data_dir
        return setup, state, folder if dist.main else None
    recipe = recipe or Recipe()
    resolve_placement(recipe)  # a device this machine lacks: refused before loading anything
    data_dir = data_folder(options.data_dir, data)
    data = data if data is not None else load_data(recipe, data_dir, options.download, progress, test_signals)
    setup = setup_run(recipe, data, dist, options.augment_images)
    folder = None
    if options.out is not None and dist.main:
        folder = RunFolder.create(options.out, options.overwrite, held=held)
    lr_found = None
    if options.find_lr_max or options.find_lr_min:
        try:
            recipe, lr_found = find_lr_bounds(setup, options.find_lr_max, options.find_lr_min,
                                              folder.path if folder else None, progress)
        except NoLRFound as e:  # recorded like a divergence: the same run would find nothing again
            if folder:
                folder.write_failed("no LR found", str(e))
            raise
        # A fresh setup after the range test: the same seed gives the same weights and data order
        # as a run started with the found values written out.
        setup = setup_run(recipe, setup.data, dist, options.augment_images)
    if folder:
        folder.write_recipe(setup.recipe)
    return setup, TrainState(lr_found=lr_found, data_dir=data_dir, started=started), folder


def train_epoch(setup: RunSetup, state: TrainState, cycle: OneCycle, stop: StopSignals,
                test_signals: TestSignals, progress: bool, run_left_in_bar: bool = False) -> bool:
    """Train epoch ``state.epoch + 1`` from batch ``state.batch`` on, until its end or a stop signal
    the ranks agree on (returns whether they did). Leaves the epoch's sums, time and position in
    ``state``. ``run_left_in_bar``: the progress bar also tells the run's time left from its steps
    so far (for a process's first epoch: the epoch lines tell it from then on)."""
    recipe, steps_per_epoch, device = setup.recipe, setup.steps_per_epoch, setup.device
    setup.model.train()
    if state.order is None:
        state.order = setup.shuffle()
    if state.draws is None:  # drawn with the order (a checkpoint from before draws were saved: state.from_before_draws)
        state.draws = setup.draw_augmentation(state.order, state.epoch + 1)
    started = time.perf_counter() - state.epoch_seconds
    loss_sum = torch.tensor(state.loss_sum, device=device)
    correct = torch.tensor(state.correct, device=device, dtype=torch.int64)
    sync_every_steps = sync_every(device, steps_per_epoch)
    bar = tqdm(setup.epoch(state.order, state.draws, state.batch), initial=state.batch, total=steps_per_epoch,
               desc=f"epoch {state.epoch + 1}/{recipe.epochs}", leave=False, disable=not progress, unit="step")
    # A checkpoint taken after the epoch's last step and before its evaluation: no step is left,
    # and the sums are the state's own, read below.
    nothing_to_train = state.batch == steps_per_epoch
    stopping = False
    first_batch, steps_started = state.batch, time.perf_counter()
    for inputs, targets in bar:
        step = state.steps_done(setup)
        send_test_signals(test_signals, step)
        lr = cycle.lr(step)
        loss, logits = setup.step(inputs, targets, lr, cycle.momentum(step))
        loss_sum += loss * len(targets)
        correct += (logits.argmax(1) == targets).sum()
        state.batch += 1
        if setup.ema:
            setup.ema.update(setup.model, step + 1, recipe.epochs * steps_per_epoch)
        # The host reads the sums (a sync) every few steps on a CPU and once an epoch on a GPU, and
        # at the epoch's end. Under torchrun the ranks agree on a stop only then, so that all stop
        # at the same step; a single process stops at the step a signal arrives.
        at_sync_point = state.batch % sync_every_steps == 0 or state.batch == steps_per_epoch
        if at_sync_point or (stop() and setup.dist.world == 1):
            stopping = gather_sums(setup, state, loss_sum, correct, stop)
            check_finite_loss(setup, state, lr)
            postfix: dict[str, str] = {}
            # On a CPU the seed's first epoch alone takes 15 minutes or more, and its line is the first
            # to tell the run's time left; the bar tells it sooner, the evaluations left out, and first,
            # where a terminal of 80 columns still shows it.
            if run_left_in_bar and progress:
                a_step = (time.perf_counter() - steps_started) / (state.batch - first_batch)
                left = about_left([a_step], recipe.epochs * steps_per_epoch - state.steps_done(setup))
                if left:
                    postfix["run"] = left
            postfix |= {"lr": f"{lr:.4f}", "loss": f"{state.loss_sum / (state.batch * recipe.batch_size):.3f}",
                        "acc": f"{state.correct / (state.batch * recipe.batch_size):.3f}"}
            bar.set_postfix(postfix)
            if stopping and state.batch < steps_per_epoch:
                break
    bar.close()
    if nothing_to_train:
        stopping = gather_sums(setup, state, loss_sum, correct, stop)
        check_finite_loss(setup, state, cycle.lr(state.steps_done(setup) - 1))
    if state.steps_done(setup) == recipe.epochs * steps_per_epoch:  # the weight average is final
        setup.refresh_average_statistics()
    synchronize(device)  # the host clock must not stop before the GPU's queue is done
    state.epoch_seconds = time.perf_counter() - started
    return stopping


def gather_sums(setup: RunSetup, state: TrainState, loss_sum: torch.Tensor, correct: torch.Tensor,
                stop: StopSignals) -> bool:
    """Add up the epoch's sums over the ranks into ``state`` (the host sync), and whether any rank
    has received a stop signal: every rank learns the same, so all stop at the same step."""
    flags = torch.tensor(float(stop()), device=setup.device, dtype=torch.float64)
    total = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), flags]), setup.dist)
    total_loss, total_correct, stops = total.tolist()  # the host sync
    state.loss_sum, state.correct = total_loss, int(total_correct)
    return bool(stops)


def check_finite_loss(setup: RunSetup, state: TrainState, lr: float) -> None:
    """Refuse a diverged loss (the last good checkpoint stays as it is), naming where and at which LR."""
    running = state.loss_sum / (state.batch * setup.recipe.batch_size)
    if not math.isfinite(running):
        raise DivergenceError(
            f"training diverged: loss is {running} in epoch {state.epoch + 1}, by step {state.steps_done(setup)} "
            f"(LR {lr:.4g}); lower {as_setting('lr_max')} (now {setup.recipe.lr_max:g})")


def evaluate_epoch(setup: RunSetup, state: TrainState, cycle: OneCycle,
                   stop: StopSignals | None) -> EpochMetrics:
    """The epoch's row: its training sums and time, and the loss and accuracy on the split each
    epoch is evaluated on (with flip TTA too when the recipe asks for it every epoch). The last
    epoch's evaluation is the delivered model's (a weight average's statistics are final by then):
    it also scores TTA and keeps the test set's probabilities, in ``state.final_scores``, so that
    the run's end need not evaluate that split again."""
    last = state.steps_done(setup) == setup.recipe.epochs * setup.steps_per_epoch
    scores = setup.evaluate(tta=setup.recipe.tta or last, stop=stop,
                            keep_probabilities=last and setup.epoch_split == "test")
    if last:
        state.final_scores = scores
    loss, acc, tta = scores.loss, scores.acc, scores.tta_acc if setup.recipe.tta else None
    seen = setup.steps_per_epoch * setup.recipe.batch_size
    held_out = {"val_loss": loss, "val_acc": acc, "val_acc_tta": tta} if setup.epoch_split == "val" else {}
    # Achieved TFLOP/s, nanoGPT's MFU numerator: on a GPU, where it says how busy the card was; a
    # CPU's is not worth a column.
    tflops = setup.flops_per_image * seen / state.epoch_seconds / 1e12 if setup.device.type == "cuda" else None
    return EpochMetrics(state.epoch + 1, cycle.lr(state.steps_done(setup) - 1), state.loss_sum / seen,
                        state.correct / seen, None if held_out else loss, None if held_out else acc,
                        state.epoch_seconds, seen / state.epoch_seconds, None if held_out else tta, **held_out,
                        tflops=tflops)


def record_epoch(history: list[EpochMetrics], folder: RunFolder | None, board: Any, progress: bool,
                 epochs: int, left: str) -> None:
    """Show the finished epoch's line (``left``: the run's time left), rewrite metrics.csv and log
    the epoch's scalars to TensorBoard."""
    metrics = history[-1]
    if progress:
        tqdm.write(format_epoch(metrics, epochs, left))
    if folder:
        folder.write_metrics(history)
    if board:
        for name, value in vars(metrics).items():
            if name != "epoch" and value is not None:
                board.add_scalar(name, value, metrics.epoch)
        board.flush()


def stopped(setup: RunSetup, stop: StopSignals, where: str, resume_from: Path | None) -> Interrupted:
    """The stop message to raise, once the checkpoint is saved. Under torchrun every rank first waits
    for the others: torchrun ends the rest (SIGTERM) as soon as one exits, and rank 1, with nothing
    to save, had cut rank 0's save short in 1 of 4 stops on 2 cores of an AVX2-only EPYC."""
    wait_for_ranks(setup.dist)
    return interrupted(stop.received, where, resume_from)


def save_checkpoint(folder: RunFolder | None, state: TrainState, setup: RunSetup) -> None:
    """Write checkpoint.pt into ``folder`` (rank 0's, with checkpoints on); nothing to do without one.
    The other ranks hold nothing of their own: the random state that draws each epoch is shared."""
    if folder:
        folder.save_checkpoint(state.to_checkpoint(setup))


def finish_run(setup: RunSetup, state: TrainState, folder: RunFolder | None, commit: str | None,
               report: bool) -> dict[str, Any]:
    """summary.json, the delivered weights and (with ``report``) the pictures and report.md."""
    recipe, history = setup.recipe, state.history
    report = report and folder is not None
    final: dict[str, Any] = {}
    probabilities = None
    # Whatever the recipe says: the TTA accuracy of the model delivered, and with a weight average,
    # what the trained weights alone would have scored; with a holdout, the test set's one
    # evaluation. The last epoch's pass gave them on its split (and the report's predictions, a
    # single process: a rank holds its part alone); one pass (2 forward passes with flip TTA) gives
    # them on the test set after a holdout, or after a resume that began past that epoch's pass.
    for split in ("val", "test") if setup.epoch_split == "val" else ("test",):
        scores = state.final_scores if split == setup.epoch_split else None
        keep = report and split == "test" and setup.dist.world == 1
        if scores is None:
            scores = setup.evaluate(tta=True, split=split, keep_probabilities=keep)
        if split != setup.epoch_split:
            final[f"final_{split}_loss"], final[f"final_{split}_acc"] = scores.loss, scores.acc
        if keep:
            probabilities = scores.probabilities
        final[f"final_{split}_acc_tta"] = scores.tta_acc
        # With lookahead the trained weights end as the average: a pass spared (5,000 images: 9 s in
        # bf16, 19 s in fp32 on 2 EPYC cores, benchmarks/results/eval-batch-cpu-*.json).
        if setup.ema:
            final[f"final_{split}_acc_without_ema"] = (scores.acc if recipe.trained_ends_as_average
                                                       else setup.evaluate(average=False, split=split).acc)
        else:
            final[f"final_{split}_acc_without_ema"] = None
    # The run's time counts these passes: on a CPU, 26 s of a 95 s `quick` run with a holdout (when
    # they took a pass more).
    summary = run_summary(setup, history, state.lr_found, state.seconds(), state.data_dir, commit) | final
    if folder:
        folder.save_weights(setup.delivered_model, recipe)
        folder.write_summary(summary)
        if report:  # adds per-class accuracy to the summary
            summary = write_report(folder.path, setup.delivered_model, recipe, history, summary, setup.test_images,
                                   setup.test_labels, setup.data.train_images[:20], setup.steps_per_epoch,
                                   setup.precision, probabilities)
            folder.write_summary(summary)
    return summary


def run_device(recipe: Recipe | None, resume: str | Path | None) -> str:
    """The device setting that picks torchrun's backend (NCCL for CUDA, gloo for the CPU): the
    recipe's, or a resumed run's own, read before the process group exists (a CPU run resumed on a
    machine with CUDA must join a gloo group, as it started). A folder without a readable recipe
    falls back to auto; ``start_run`` then says what is wrong with it."""
    if recipe is None and resume is not None:
        with contextlib.suppress(UserError):
            return RunFolder(resume).read_recipe().device
    return recipe.device if recipe else "auto"


def load_data(recipe: Recipe, data_dir: str | None, download: bool, progress: bool,
              test_signals: TestSignals) -> LabelledImages:
    """The recipe's data set from ``data_dir`` (default ./data), with a download bar when
    ``progress``, and a line saying how many images ``skip_bad_images`` left out."""
    send_test_signals(test_signals, "load")
    data = load_dataset(recipe, data_dir or "data", download=download, progress=progress)
    if data.skipped and progress:
        tqdm.write(f"skipped {len(data.skipped)} image(s) that cannot be read (the first: {one_line(data.skipped[0])})")
    return data


@contextlib.contextmanager
def damaged_checkpoint(folder: RunFolder) -> Iterator[None]:
    """A checkpoint that does not fit its run (``TrainState``'s ValueError) as the user's error."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{as_setting('resume')} {folder.path}: {CHECKPOINT} is damaged or does not fit this run "
                        f"({e}); start the "
                        f"run again, or resume a copy of its folder that is whole") from None


def check_same_recipe(recipe: Recipe, saved: Recipe, run_dir: Path) -> None:
    """A resumed run keeps its own recipe: refuse a ``recipe`` that differs, naming the first change."""
    changed = [k for k, v in recipe.to_dict().items()  # a data setting left to the data is the saved one
               if getattr(saved, k) != v and not (k in DATA_FIELDS and v is None)]
    if changed:
        raise UserError(f"{as_setting('resume')} {run_dir}: the run's own recipe is used; {changed[0]} would change "
                        f"from {getattr(saved, changed[0])!r} to {getattr(recipe, changed[0])!r}")


def data_folder(given: str | Path | None, data: LabelledImages | None) -> str | None:
    """The data folder a run records, as an absolute path: the one given, else ./data; None for data
    given in memory only. ``abspath``, not ``resolve``: it touches no file, so a folder that cannot be
    read fails in the data loader, which says so, rather than here with a traceback."""
    if given is None and data is not None:
        return None
    return os.path.abspath(given or "data")


def tensorboard_writer(run_dir: str | Path | None) -> Any:
    """torch's SummaryWriter class; a clear error without a run folder or the tensorboard extra."""
    if run_dir is None:
        raise UserError(f"{as_setting('tensorboard')} needs a run folder ({as_setting('out')})")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"{as_setting('tensorboard')} needs the tensorboard package: pip install "
                        f"'cifar-onecycle[tensorboard]'") from None
    return SummaryWriter
