"""The training run: data on the device, batched augmentation, One Cycle SGD, one epoch line each.

``train`` reads top to bottom: set up, then for each epoch a shuffled pass of augmented batches with
the LR set before every step, an evaluation pass, and the run folder brought up to date.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .augment import epoch_batches, normalize, pad_reflect
from .checkpoint import CHECKPOINT, WEIGHTS, atomic_write, load_checkpoint, save_checkpoint, save_weights
from .data import Cifar10, load_cifar10
from .distributed import (Dist, all_reduce_sum, broadcast_buffers, check_batch, gather_objects,
                          init_distributed, test_shard)
from .ema import WeightEMA
from .errors import DivergenceError, RecipeError, UserError
from .lr_finder import DEFAULT_EPOCHS, LRFinderResult, find_lr, write_lr_find
from .model import ResNet9, count_parameters
from .recipe import Recipe
from .report import write_report
from .schedule import lr_at, one_cycle_knots

RUN_FILES = ("recipe.toml", "metrics.csv", "summary.json", "seeds.json", WEIGHTS, CHECKPOINT)
# How often (in steps) the loop reads the running loss back from the device, for the progress bar,
# the divergence check and (under torchrun) the ranks' agreement on a stop signal. On a CPU every 10
# steps: a read costs nothing there and a diverged loss is caught within 10 steps. On a GPU each read
# is a host sync that drains the queue and leaves the GPU idle while the host launches the next
# step, so there the loop reads once, at the epoch's end (97 steps, about half a second on an H200).
CPU_SYNC_EVERY = 10


def sync_every(device: torch.device, steps_per_epoch: int) -> int:
    return CPU_SYNC_EVERY if device.type == "cpu" else steps_per_epoch


# For tests only: CIFAR_ONECYCLE_TEST_SIGNALS="SIGTERM@6,SIGINT@9" makes the run send itself each
# signal as the step of that number (from 0, over the whole run) begins, as if it arrived from outside
# during that step: a stop at an exact step, with no sleeps and no patched internals.
TEST_SIGNALS = "CIFAR_ONECYCLE_TEST_SIGNALS"


def signals_for_tests() -> dict[int, list[signal.Signals]]:
    """The test hook's signals by step; empty unless the environment asks for them."""
    plan: dict[int, list[signal.Signals]] = {}
    for item in filter(None, os.environ.get(TEST_SIGNALS, "").split(",")):
        name, _, step = item.partition("@")
        plan.setdefault(int(step), []).append(signal.Signals[name.strip()])
    return plan


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


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively (AVX512-BF16 or AMX). Without it bf16 is emulated and
    far slower than fp32: measured 166 s against 12.5 s per 512-image step on an AVX2-only EPYC."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA with bf16 and on CPUs with native bf16, fp16 on older GPUs, else fp32."""
    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise UserError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
             batch_size: int = 1000, precision: str = "fp32", channels_last: bool = True,
             tta: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on uint8 NCHW ``images`` (on the model's device).
    ``tta``: average the logits of each image and its mirror image."""
    loss_sum, correct = evaluate_sums(model, images, labels, batch_size=batch_size, precision=precision,
                                      channels_last=channels_last, tta=tta)
    return loss_sum.item() / len(images), correct.item() / len(images)


@torch.no_grad()
def evaluate_sums(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                  batch_size: int = 1000, precision: str = "fp32", channels_last: bool = True,
                  tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and number correct, as device tensors (no host sync)."""
    was_training = model.training
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size]).contiguous(memory_format=fmt)
        y = labels[i:i + batch_size]
        with autocast(device, precision):
            logits = model(x).float()
            if tta:  # costs a second forward pass
                logits = (logits + model(x.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    return loss_sum, correct


def prepare_run_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Create ``out``, refusing one that holds another run unless ``overwrite``; check it is writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another --out")
    taken = [f for f in RUN_FILES if (out / f).exists()]
    if taken and not overwrite:
        raise UserError(f"--out {out}: already holds a run ({taken[0]}); choose another --out or "
                        f"pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / ".write-test", b"")
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); choose another --out") from None
    for f in taken:  # overwrite: a stale file from the old run must not pass for the new run's
        (out / f).unlink()
    return out


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def metrics_csv(history: list[EpochMetrics]) -> str:
    """A row per epoch; the TTA column only in runs that measure it."""
    names = [f.name for f in dataclasses.fields(EpochMetrics)]
    if not any(m.test_acc_tta is not None for m in history):
        names.remove("test_acc_tta")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    for m in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(m).items() if k in names})
    return buf.getvalue()


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    """The one line per epoch that the CLI shows."""
    return (f"epoch {m.epoch:>{len(str(epochs))}}/{epochs}  lr {m.lr:.5f}  "
            f"train loss {m.train_loss:.4f} acc {m.train_acc:6.2%}  "
            f"test loss {m.test_loss:.4f} acc {m.test_acc:6.2%}"
            + (f" tta {m.test_acc_tta:6.2%}  " if m.test_acc_tta is not None else "  ") +
            f"{m.train_seconds:6.1f}s  {m.images_per_second:7.1f} img/s")


@dataclass
class RunSetup:
    """Everything a run trains with, on its device: data, model, optimizer, random generator."""

    recipe: Recipe
    device: torch.device
    precision: str
    memory_format: torch.memory_format
    train_images: torch.Tensor   # uint8, already padded for the crop
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    model: torch.nn.Module
    step_model: torch.nn.Module  # the model, or its DDP / torch.compile wrapper
    optimizer: torch.optim.Optimizer
    generator: torch.Generator      # data order: the same on every rank
    aug_generator: torch.Generator  # augmentation: this rank's own (the same object on one process)
    dist: Dist = field(default_factory=Dist)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_images) // self.recipe.batch_size

    def shuffle(self) -> torch.Tensor:
        """A new epoch's order of the training images."""
        return torch.randperm(len(self.train_images), device=self.device, generator=self.generator)

    def epoch(self, order: torch.Tensor | None = None, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Augmented training batches in ``order`` (a new shuffle when None), from batch ``start``."""
        r = self.recipe
        return epoch_batches(self.train_images, self.train_labels, r.batch_size, crop=r.crop,
                             padding=r.crop_padding if r.crop else 0, flip=r.flip,
                             cutout_size=r.cutout_size if r.cutout else 0, generator=self.aug_generator,
                             order=self.shuffle() if order is None else order, start=start,
                             rank=self.dist.rank, world=self.dist.world, memory_format=self.memory_format)

    def autocast(self) -> torch.autocast:
        return autocast(self.device, self.precision)


def evaluate_run(s: RunSetup, model: torch.nn.Module | None = None, tta: bool = False) -> tuple[float, float]:
    """Test loss and accuracy of ``model`` (default: the one trained) over the whole test set, each
    rank evaluating its own contiguous part with rank 0's BatchNorm statistics, the sums added up
    across ranks."""
    if model is None:  # DDP's forward would add collectives: under torchrun, the bare model
        model = s.step_model if s.dist.world == 1 else s.model
    broadcast_buffers(model, s.dist)
    part = test_shard(len(s.test_images), s.dist.rank, s.dist.world)
    loss_sum, correct = evaluate_sums(model, s.test_images[part], s.test_labels[part],
                                      batch_size=s.recipe.eval_batch_size, precision=s.precision,
                                      channels_last=s.recipe.channels_last, tta=tta)
    total = all_reduce_sum(torch.stack([loss_sum.double(), correct.double()]), s.dist).tolist()
    return total[0] / len(s.test_images), total[1] / len(s.test_images)


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device,
                   fused: bool | None = None) -> torch.optim.SGD:
    """The recipe's SGD. ``fused`` (default: on CUDA) updates every parameter in one kernel instead
    of a few per parameter group: fewer launches for a step that takes milliseconds on a GPU (the
    eager step went from 105,000 to 108,000 images a second on an H200). The CPU keeps the
    implementation it has always used (its results are pinned by tests)."""
    use_fused = device.type == "cuda" if fused is None else fused
    return torch.optim.SGD(model.parameters(), lr=recipe.lr_min, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay, fused=use_fused or None)


def check_fits(recipe: Recipe, data: Cifar10) -> int:
    """The number of training images the recipe uses; refuse a subset or batch the data cannot give."""
    n_train = recipe.train_subset or len(data.train_images)
    if n_train > len(data.train_images):
        raise UserError(f"--train-subset {n_train}: only {len(data.train_images)} training images")
    if recipe.batch_size > n_train:
        raise UserError(f"--batch-size {recipe.batch_size} is larger than the {n_train} training "
                        f"images; pass a smaller --batch-size")
    return n_train


def setup_run(recipe: Recipe, data: Cifar10, d: Dist | None = None) -> RunSetup:
    """Move the data to the device and build the model and optimizer, seeded from the recipe.

    Under torchrun (``d.world > 1``) the model is wrapped in DistributedDataParallel; every rank
    starts from the same weights (same seed, and DDP broadcasts rank 0's at wrapping).
    """
    d = d or Dist()
    device = resolve_device(recipe.device)
    precision = resolve_precision(recipe.precision, device)
    n_train = check_fits(recipe, data)
    check_batch(recipe.batch_size, d)
    if recipe.sync_bn and d.world > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); leave it out on the CPU")
    # The whole uint8 data set lives on the device (150 MB for CIFAR-10): no loader, no workers.
    # Padding once here, not per batch, leaves each step a single gather for its crops.
    train_images = pad_reflect(data.train_images[:n_train].to(device), recipe.crop_padding if recipe.crop else 0)
    torch.manual_seed(recipe.seed)  # the weights' initialisation
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model: torch.nn.Module = ResNet9(logit_scale=recipe.logit_scale, bn_momentum=recipe.bn_momentum)
    if recipe.sync_bn and d.world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=fmt)
    # cuDNN's benchmark mode is left off: on an H200 its choices made the eager step slower (90,000
    # and 103,000 images a second against 105,000 and 108,000 with cuDNN's heuristics, for-each and
    # fused SGD; benchmarks/results/gpu-h200-levers/).
    optimizer = make_optimizer(model, recipe, device)
    step_model = model
    if d.world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    if recipe.compile:
        step_model = torch.compile(step_model, mode=recipe.compile_mode)
    order_gen = torch.Generator(device=device).manual_seed(recipe.seed)
    # Each rank augments its own share with its own draws; one process keeps one generator.
    aug_gen = order_gen if d.world == 1 else torch.Generator(device=device).manual_seed(
        recipe.seed * 1_000_003 + d.rank + 1)
    return RunSetup(recipe, device, precision, fmt, train_images, data.train_labels[:n_train].to(device),
                    data.test_images.to(device), data.test_labels.to(device), model, step_model, optimizer,
                    order_gen, aug_gen, d)


# The sweep that ``--lr-max auto`` and ``--lr-min auto`` run: the linear one, Smith's One Cycle test.
AUTO_SWEEP = "linear"


def sweep_iterations(mode: str, steps_per_epoch: int, epochs: float | None = None, num_iter: int | None = None) -> int:
    """A sweep's length: ``num_iter`` when given, else ``epochs`` (default: the mode's) of the
    recipe's batches."""
    if num_iter is not None:
        return num_iter
    return max(1, round((DEFAULT_EPOCHS[mode] if epochs is None else epochs) * steps_per_epoch))


def lr_range_test(recipe: Recipe, data: Cifar10, modes: Sequence[str] = ("exp",), progress: bool = True, *,
                  epochs: float | None = None, num_iter: int | None = None, **sweep: Any) -> dict[str, LRFinderResult]:
    """The LR range test on the recipe's model, augmented batches, optimizer and precision.

    Each sweep lasts ``num_iter`` iterations, or ``epochs`` epochs of the recipe's batches (default:
    ``DEFAULT_EPOCHS`` of its mode). ``sweep``: the other ``find_lr`` settings (start_lr, end_lr,
    smooth, diverge, method, patience).
    """
    d = init_distributed(recipe.device)
    s = setup_run(recipe, data, d)
    # Under torchrun every rank must see the same loss, or their stopping decisions would differ.
    reduce = (lambda t: all_reduce_sum(t.clone(), d) / d.world) if d.world > 1 else None
    results = {}
    for mode in modes:
        iterations = sweep_iterations(mode, s.steps_per_epoch, epochs, num_iter)
        bar = tqdm(total=iterations, desc=f"lr-find {mode}", leave=False,
                   disable=not (progress and d.main), unit="it")
        results[mode] = find_lr(s.step_model, s.epoch, s.optimizer, mode=mode, autocast=s.autocast, reduce=reduce,
                                loss_fn=partial(F.cross_entropy, label_smoothing=recipe.label_smoothing),
                                progress=lambda i, lr, loss: (bar.update(), bar.set_postfix(lr=f"{lr:.3g}",
                                                                                          loss=f"{loss:.3f}")),
                                num_iter=iterations, **sweep)
        bar.close()
    return results


class Interrupted(UserError):
    """SIGINT or SIGTERM: the run saved a checkpoint and stopped. Exit code 130."""

    exit_code = 130


class StopSignals:
    """While active, SIGINT and SIGTERM set ``received`` instead of killing the run, so the loop can
    finish its step and checkpoint. A second signal of either kind stops at once (KeyboardInterrupt).
    Only in the main thread (Python delivers signals nowhere else); elsewhere it does nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _rng_state(s: RunSetup) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": s.generator.get_state()}
    if s.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(s: RunSetup, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    s.generator.set_state(state["generator"])
    if "aug" in state:
        if len(state["aug"]) != s.dist.world:
            raise UserError(f"--resume: the checkpoint was written by {len(state['aug'])} processes; resume it "
                            f"with the same number (now {s.dist.world})")
        s.aug_generator.set_state(state["aug"][s.dist.rank])
    elif s.dist.world > 1:
        raise UserError("--resume: the checkpoint was written by one process; resume it without torchrun")
    if "cuda" in state and s.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])


def check_same_recipe(recipe: Recipe, saved: Recipe, run_dir: Path) -> None:
    """A resumed run keeps its own recipe: refuse a ``recipe`` that differs, naming the first change."""
    changed = [k for k, v in recipe.to_dict().items() if getattr(saved, k) != v]
    if changed:
        raise UserError(f"--resume {run_dir}: the run's own recipe is used; {changed[0]} would change "
                        f"from {getattr(saved, changed[0])!r} to {getattr(recipe, changed[0])!r}")


def _data_dir(given: str | Path | None, data: Cifar10 | None) -> str | None:
    """The data folder a run records: the one given, else ./data; None for data given in memory only."""
    if given is None and data is not None:
        return None
    return str(Path(given or "data").resolve())


def _start(recipe: Recipe | None, data_dir: str | Path | None, download: bool, out: str | Path | None, overwrite: bool,
           data: Cifar10 | None, progress: bool, find_lr_max: bool, find_lr_min: bool,
           resume: str | Path | None, d: Dist) -> tuple[Recipe, Path | None, Cifar10, str | None, dict | None, dict | None]:
    """Recipe, run folder, data, data folder (None for data given in memory), LR found and
    checkpoint (when resuming) of a run about to train. Only rank 0 makes and writes the folder."""
    if resume is not None:
        run_dir = Path(resume)
        state, saved = load_checkpoint(run_dir / CHECKPOINT)
        for stale in run_dir.glob(".*.tmp") if d.main else ():  # left by a write killed before its rename
            stale.unlink(missing_ok=True)
        if recipe is not None:
            check_same_recipe(recipe, saved, run_dir)
        # A run killed between its last checkpoint and its summary is finished by the resume.
        if state["epoch"] >= saved.epochs and (run_dir / "summary.json").exists():
            raise UserError(f"--resume {run_dir}: this run already finished all {saved.epochs} epochs")
        resolve_precision(saved.precision, resolve_device(saved.device))
        data_dir = _data_dir(data_dir or state.get("data_dir"), data)
        data = data if data is not None else load_cifar10(data_dir, download=download)
        return saved, run_dir, data, data_dir, state.get("lr_found"), state
    recipe = recipe or Recipe()
    resolve_precision(recipe.precision, resolve_device(recipe.device))  # refuse a bad device before any work
    # The data first: a missing or bad data set must not leave a half-made run folder behind.
    data_dir = _data_dir(data_dir, data)
    data = data if data is not None else load_cifar10(data_dir, download=download)
    check_fits(recipe, data)
    check_batch(recipe.batch_size, d)
    run_dir = prepare_run_dir(out, overwrite) if out is not None and d.main else None
    lr_found = None
    if find_lr_max or find_lr_min:
        recipe, lr_found = _find_lr_bounds(recipe, data, run_dir, find_lr_max, find_lr_min, progress and d.main)
    if run_dir:
        atomic_write(run_dir / "recipe.toml", recipe.to_toml())
    return recipe, run_dir, data, data_dir, lr_found, None


def _find_lr_bounds(recipe: Recipe, data: Cifar10, run_dir: Path | None, find_lr_max: bool, find_lr_min: bool,
                    progress: bool) -> tuple[Recipe, dict[str, Any]]:
    """Run the ``AUTO_SWEEP`` range test and put its LRMAX and/or LRMIN into the recipe; returns the
    new recipe and how the values were found (for summary.json)."""
    found = lr_range_test(recipe, data, (AUTO_SWEEP,), progress=progress)[AUTO_SWEEP]
    wanted = [name for name, on in (("lr_max", find_lr_max), ("lr_min", find_lr_min)) if on]
    values = {"lr_max": found.suggested_lr_max, "lr_min": found.suggested_lr_min}
    if run_dir:
        write_lr_find({AUTO_SWEEP: found}, run_dir)
    for name in wanted:
        if values[name] is None:
            why = found.note or found.stopped or "no suggestion"
            raise UserError(f"{name} auto: the LR range test found no {name.upper().replace('_', '')} ({why}); "
                            f"set {name} explicitly")
    found_values = {name: values[name] for name in wanted}
    # a found LRMIN replaces a LRMIN derived from LRMAX
    changes = {**found_values, **({"lr_min_div": 0.0} if find_lr_min else {})}
    lr_found = {**found_values, "sweep": AUTO_SWEEP, "iterations": len(found.lrs),
                "lr_range": [found.lrs[0], found.lrs[-1]], "lr_max_rule": found.lr_max_rule if find_lr_max else None,
                "lr_min_rule": found.lr_min_rule if find_lr_min else None, "note": found.note}
    if progress:
        tqdm.write("lr-find: " + ", ".join(f"{name.upper().replace('_', '')} {values[name]:.4g}" for name in wanted)
                   + f" ({AUTO_SWEEP} sweep, {len(found.lrs)} iterations)")
    try:
        return recipe.replace(**changes), lr_found
    except RecipeError as e:  # e.g. a found LRMIN above the LRMAX given
        raise UserError(f"the LR range test's values do not fit the recipe: {e}") from None


def train(recipe: Recipe | None = None, *, data_dir: str | Path | None = None, download: bool = True,
          out: str | Path | None = None, overwrite: bool = False, data: Cifar10 | None = None,
          progress: bool = True, find_lr_max: bool = False, find_lr_min: bool = False,
          resume: str | Path | None = None,
          report: bool = True, tensorboard: bool = False, checkpoints: bool = True) -> TrainResult:
    """Train the seed's ResNet with the One Cycle policy and return its history and model.

    ``data``: an already loaded data set (else it is read from ``data_dir``, default ./data or, when
    resuming, the run's own; given both, ``data_dir`` says where ``data`` came from). ``out``: a run
    folder for recipe.toml, metrics.csv, summary.json, the weights and a checkpoint after every epoch
    (and on SIGINT/SIGTERM); none when ``None``.
    ``progress``: a progress bar and a line per epoch. ``find_lr_max`` / ``find_lr_min``: run the
    linear LR range test first and use its LRMAX / LRMIN suggestion (``lr_range_test``).
    ``resume``: a run folder whose checkpoint to continue, with its own recipe. ``report``: write
    the pictures and report.md into the run folder at the end. ``tensorboard``: also log each
    epoch's scalars to RUN_DIR/tensorboard (needs the ``tensorboard`` extra). ``checkpoints``: write
    checkpoint.pt after every epoch and on a stop signal (off: a run that only measures, which
    cannot be resumed).
    """
    started = time.perf_counter()
    commit = git_commit()  # now: the tree may move on while a long run trains
    d = init_distributed(recipe.device if recipe else "auto")
    progress = progress and d.main  # under torchrun only rank 0 shows progress and writes files
    writer_class = tensorboard_writer(out or resume) if tensorboard and d.main else None  # refused before any work
    recipe, run_dir, data, data_dir, lr_found, ckpt = _start(recipe, data_dir, download, out, overwrite, data, progress,
                                                             find_lr_max, find_lr_min, resume, d)
    tb = writer_class(log_dir=str(run_dir / "tensorboard")) if writer_class else None
    # A fresh setup after any range test: the same seed gives the same weights and data order as
    # a run started with the found LRMAX written out.
    s = setup_run(recipe, data, d)
    device, precision, model, optimizer = s.device, s.precision, s.model, s.optimizer
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ema = WeightEMA(model, recipe.ema_decay, recipe.ema_every) if recipe.ema_decay else None
    evaluated = ema.model if ema else None  # None: the trained model itself
    steps_per_epoch = s.steps_per_epoch
    read_every = sync_every(device, steps_per_epoch)
    signals_at = signals_for_tests()
    knots = one_cycle_knots(recipe.epochs, steps_per_epoch, recipe.peak_epoch, recipe.lr_min, recipe.lr_max)
    history: list[EpochMetrics] = []
    done, batch, order, sums, elapsed = 0, 0, None, (0.0, 0, 0.0), 0.0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema:
            ema.model.load_state_dict(ckpt["ema"])
        _set_rng_state(s, ckpt["rng"])
        history = [EpochMetrics(**h) for h in ckpt["history"]]
        done, batch, elapsed = ckpt["epoch"], ckpt["batch"], ckpt["elapsed"]
        order = ckpt["order"].to(device) if ckpt["order"] is not None else None
        # mid-epoch sums are global: rank 0 carries them, the others start from zero
        sums = (ckpt["loss_sum"], ckpt["correct"], ckpt["epoch_seconds"]) if d.main else (0.0, 0, ckpt["epoch_seconds"])

    def checkpoint(epoch_done: int, next_batch: int, order: torch.Tensor | None, sums: tuple) -> Path | None:
        """Everything needed to continue bit for bit: weights, optimizer, position, random states.
        Under torchrun every rank calls it (the augmentation states are gathered); rank 0 writes."""
        augs = gather_objects(s.aug_generator.get_state(), d) if d.world > 1 else None
        if run_dir is None or not checkpoints:
            return None
        save_checkpoint(run_dir / CHECKPOINT, {
            "recipe": recipe.to_dict(), "model": {k: v.contiguous() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "ema": {k: v.contiguous() for k, v in ema.model.state_dict().items()} if ema else None,
            "rng": {**_rng_state(s), **({"aug": augs} if augs else {})}, "epoch": epoch_done, "batch": next_batch,
            "order": order.cpu() if order is not None else None, "loss_sum": sums[0], "correct": sums[1],
            "epoch_seconds": sums[2], "history": [asdict(h) for h in history], "lr_found": lr_found,
            "elapsed": elapsed + time.perf_counter() - started,
            "data_dir": data_dir})
        return run_dir / CHECKPOINT

    saved_to = (out or resume) if checkpoints else None  # where a stopped run's checkpoint is
    with StopSignals() if run_dir or d.world > 1 else contextlib.nullcontext(StopSignals()) as stop:
        for epoch in range(done + 1, recipe.epochs + 1):
            model.train()
            order = s.shuffle() if order is None else order
            t0 = time.perf_counter() - sums[2]
            loss_sum = torch.tensor(sums[0], device=device)
            correct = torch.tensor(sums[1], device=device, dtype=torch.int64)
            step = (epoch - 1) * steps_per_epoch + batch
            bar = tqdm(s.epoch(order, batch), initial=batch, total=steps_per_epoch,
                       desc=f"epoch {epoch}/{recipe.epochs}", leave=False, disable=not progress, unit="step")
            for i, (x, y) in enumerate(bar, start=batch):
                for sig in signals_at.get(step, ()):
                    os.kill(os.getpid(), sig)
                lr = lr_at(step, knots)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with s.autocast():
                    logits = s.step_model(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                step += 1
                if ema:
                    ema.update(model, step, final=step == recipe.epochs * steps_per_epoch)
                stopping = False
                # One process checks for a signal after every step; under torchrun the ranks agree
                # on it (and on the loss) only at the sync points, so that all stop at the same step.
                if (i + 1) % read_every == 0 or i + 1 == steps_per_epoch or (stop.received and d.world == 1):
                    seen = (i + 1) * recipe.batch_size
                    total = all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                                        torch.tensor(float(bool(stop.received)), device=device,
                                                                     dtype=torch.float64)]), d)
                    total_loss, total_correct, stopping = total.tolist()  # host sync
                    running = total_loss / seen
                    if not math.isfinite(running):  # the last good checkpoint stays as it is
                        raise DivergenceError(
                            f"training diverged: loss is {running} in epoch {epoch}, by step {step} "
                            f"(LR {lr:.4g}); lower --lr-max (now {recipe.lr_max:g})")
                    bar.set_postfix(lr=f"{lr:.4f}", loss=f"{running:.3f}", acc=f"{total_correct / seen:.3f}")
                if stopping and i + 1 < steps_per_epoch:
                    bar.close()
                    checkpoint(epoch - 1, i + 1, order, (total_loss, int(total_correct), time.perf_counter() - t0))
                    raise interrupted(stop.received, f"in epoch {epoch} after step {step}", saved_to)
            bar.close()
            if device.type == "cuda":  # the host clock must not stop before the GPU's queue is done
                torch.cuda.synchronize(device)
            train_seconds = time.perf_counter() - t0
            seen = steps_per_epoch * recipe.batch_size
            test_loss, test_acc = evaluate_run(s, evaluated)
            m = EpochMetrics(epoch, lr, total_loss / seen, total_correct / seen, test_loss, test_acc,
                             train_seconds, seen / train_seconds,
                             evaluate_run(s, evaluated, tta=True)[1] if recipe.tta else None)
            history.append(m)
            batch, order, sums = 0, None, (0.0, 0, 0.0)
            if progress:
                tqdm.write(format_epoch(m, recipe.epochs))
            if run_dir:
                atomic_write(run_dir / "metrics.csv", metrics_csv(history))
            checkpoint(epoch, 0, None, sums)  # every rank: it gathers the ranks' random states
            if tb:
                for name, value in asdict(m).items():
                    if name != "epoch" and value is not None:
                        tb.add_scalar(name, value, epoch)
                tb.flush()
            if stopping and epoch < recipe.epochs:
                raise interrupted(stop.received, f"after epoch {epoch}", saved_to)

    if tb:
        tb.close()
    summary = run_summary(recipe, s, history, lr_found, elapsed + time.perf_counter() - started, data_dir, commit)
    # Both ways, whatever the recipe says (one or two more test passes): the TTA accuracy of the
    # model delivered, and with a weight average, what the trained weights alone would have scored.
    summary["final_test_acc_tta"] = (history[-1].test_acc_tta if recipe.tta
                                     else evaluate_run(s, evaluated, tta=True)[1])
    summary["final_test_acc_without_ema"] = evaluate_run(s)[1] if ema else None
    model = ema.model if ema else model
    if run_dir:
        save_weights(model, run_dir / WEIGHTS, recipe)
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if report:  # pictures and report.md; adds per-class accuracy to summary.json
            summary = write_report(run_dir, model, recipe, history, summary, s.test_images, s.test_labels,
                                   data.train_images[:20], steps_per_epoch)
    return TrainResult(recipe, history, summary, model, run_dir)


def interrupted(received: str | None, where: str, folder: str | Path | None) -> Interrupted:
    """The one-line stop message: what stopped the run, where, and the exact resume command."""
    why = f"stopped by {received or 'a signal to another rank'} {where}"
    if folder is None:
        return Interrupted(f"{why}; no run folder or checkpoints off, so nothing was saved")
    return Interrupted(f"{why}; checkpoint saved in {Path(folder) / CHECKPOINT}; resume with: "
                       f"cifar-onecycle train --resume {folder}")


def tensorboard_writer(run_dir: str | Path | None) -> Any:
    """torch's SummaryWriter class; a clear error without a run folder or the tensorboard extra."""
    if run_dir is None:
        raise UserError("--tensorboard needs a run folder (--out)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'cifar-onecycle[tensorboard]'") from None
    return SummaryWriter


def run_summary(recipe: Recipe, s: RunSetup, history: list[EpochMetrics], lr_found: dict | None,
                seconds: float, data_dir: str | None, commit: str | None) -> dict[str, Any]:
    """The contents of summary.json."""
    best = max(history, key=lambda h: h.test_acc)
    return {
        "final_test_acc": history[-1].test_acc,
        "best_test_acc": best.test_acc,
        "best_epoch": best.epoch,
        "final_test_loss": history[-1].test_loss,
        "final_train_acc": history[-1].train_acc,
        "epochs": recipe.epochs,
        "steps_per_epoch": s.steps_per_epoch,
        "train_images": len(s.train_images),
        "test_images": len(s.test_images),
        "lr_min": recipe.lr_min,
        "lr_max": recipe.lr_max,
        "lr_found": lr_found,
        "total_seconds": round(seconds, 2),
        "parameters": count_parameters(s.model),
        "device": device_name(s.device),
        "precision": s.precision,
        "torch": torch.__version__,
        "cifar_onecycle": __version__,
        "git_commit": commit,
        "data_dir": data_dir,
    }
