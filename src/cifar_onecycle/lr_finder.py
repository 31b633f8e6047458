"""The LR range test (Leslie Smith, 2015): train while the LR grows, and read the loss curve.

``find_lr`` works on any ``nn.Module`` and any source of (inputs, targets) batches. It raises the LR
every iteration (exponentially or linearly), records the raw loss, its bias-corrected exponential
moving average and the batch accuracy, stops once the smoothed loss has stayed above ``diverge``
times its best for a few iterations (or the loss is not finite), and finally puts the model's and
the optimizer's state back exactly as they were: one saved copy taken before the sweep.

The question it answers by default is the One Cycle one (Smith, "Cyclical learning rates", 2017,
section 3.3; "A disciplined approach to neural network hyper-parameters", 2018): over a sweep long
enough for the network to train, which LRs train it at all, and from which LR on does a higher LR
stop helping? Those are the two ends of the cycle. The ``plateau`` rule reads both off the loss's
fall from its starting level to its lowest level (see ``fall_bounds``). fastai's ``valley`` and
torch-lr-finder's ``steepest`` rules, which answer a different question (a good constant LR for
fine-tuning), remain as options for LRMAX.

Two entry points: ``find_lr`` for any model, ``lr_range_test`` for a recipe (its model, augmented
batches, optimizer, precision and step). ``find_lr_bounds`` is what ``train`` runs for ``auto``
settings. The graphs are drawn in ``report`` beside the other pictures.
"""
from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import LabelledImages
from .distributed import all_reduce_sum, init_distributed
from .errors import NoLRFound, RecipeError, UserError, as_setting
from .host_memory import freed_memory_kept
from .recipe import Recipe, as_recipe, short_number
from .run_setup import RunSetup, setup_run
from .step import train_step

MODES = ("exp", "linear")
# Exponential sweeps span orders of magnitude, to see where the loss starts to fall and where it
# blows up. The linear sweep starts near zero, so that a freshly initialised network is trained
# into the range rather than thrown into it (from 0.02 the seed's network diverged within 6
# iterations), and ends at 1, five times the seed's LRMAX.
DEFAULT_RANGES = {"exp": (1e-5, 10.0), "linear": (1e-4, 1.0)}
# Sweep lengths in epochs of the recipe's batches. The linear sweep is the One Cycle test proper and
# must rise slowly enough for a freshly initialised network to train into the range (2 epochs blew up
# early on the seed's network, 6 did not: benchmarks/results/README.md, the defaults). The
# exponential sweep gets one epoch, about 16 iterations a decade at CIFAR-10's 97 steps an epoch.
# Together 7 epochs: seconds on a GPU, 20 minutes on a CPU with native bf16.
DEFAULT_EPOCHS = {"exp": 1.0, "linear": 6.0}
# The longest sweeps anyone can ask for: a million iterations (their LRs a list of 8 MB) are hours
# of a GPU; a thousand epochs more so.
MAX_SWEEP_ITERATIONS = 1_000_000
MAX_SWEEP_EPOCHS = 1_000
METHODS = ("plateau", "valley", "steepest")
# The One Cycle bounds as fractions of the loss's fall (its starting level minus its lowest level,
# both of the centred moving average): LRMIN where the first 5% of the fall is done (the loss has
# started to fall), LRMAX where the loss is within 5% of the fall of its lowest level (a higher
# LR no longer buys progress). 5% is the usual "settled" band of a step response: an exponential
# approach covers 95% of its way in three time constants, where a curve's knee is read by eye.
# Fixed from that principle and the synthetic curves of the tests, not from any real sweep.
FALL_FRACTION = 0.05
# The fall must stand out of the noise of the averaged curve by this many standard errors.
FALL_NOISE_RATIO = 4.0
# Like torch-lr-finder and Lightning: the first iterations are noise around the initial loss, and
# the last ones are the blow-up itself; neither may carry the suggestion.
SKIP_START, SKIP_END = 10, 5


def lr_sweep(mode: str, start_lr: float, end_lr: float, num_iter: int) -> list[float]:
    """The LR of each iteration: ``start_lr`` first, ``end_lr`` last, geometric or arithmetic between."""
    check_sweep(mode, start_lr, end_lr, num_iter)
    if mode == "exp":
        return [start_lr * (end_lr / start_lr) ** (i / (num_iter - 1)) for i in range(num_iter - 1)] + [end_lr]
    return [start_lr + (end_lr - start_lr) * i / (num_iter - 1) for i in range(num_iter - 1)] + [end_lr]


def check_sweep(mode: str, start_lr: float, end_lr: float, num_iter: int, smooth: float = 0.05,
                diverge: float = 4.0, patience: int | None = None) -> None:
    """Refuse impossible sweep settings with a one-line message."""
    if mode not in MODES:
        raise UserError(f"lr-find: unknown {as_setting('mode')} {mode!r}; use one of {', '.join(MODES)} (or both)")
    if not (math.isfinite(start_lr) and start_lr > 0):
        raise UserError(f"lr-find: {as_setting('start_lr')} must be > 0, got {start_lr}")
    if not (math.isfinite(end_lr) and end_lr > start_lr):
        raise UserError(f"lr-find: {as_setting('end_lr')} {end_lr} must be above {as_setting('start_lr')} {start_lr}")
    if not 10 <= num_iter <= MAX_SWEEP_ITERATIONS:
        raise UserError(f"lr-find: {as_setting('num_iter')} must be >= 10 and at most {MAX_SWEEP_ITERATIONS:,}, "
                        f"got {short_number(num_iter)}")
    if not 0 < smooth <= 1:
        raise UserError(f"lr-find: {as_setting('smooth')} must lie in (0, 1], got {smooth}")
    if not diverge > 1:
        raise UserError(f"lr-find: {as_setting('diverge')} must be > 1, got {diverge}")
    if patience is not None and patience < 1:
        raise UserError(f"lr-find: {as_setting('patience')} must be >= 1, got {patience}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"lr-find: unknown suggestion {as_setting('method')} {method!r}; use one of "
                        f"{', '.join(METHODS)}")


def suggest(lrs: list[float], smoothed: list[float], method: str = "valley") -> float | None:
    """An LR from the smoothed curve, or None when the sweep is too short to say.

    ``valley`` (fastai's rule): the longest run of falling loss before the minimum, and the LR two
    thirds of the way down it. ``steepest`` (torch-lr-finder, Lightning): the most negative slope of
    the smoothed loss against log LR. Both look only between the skipped ends and at or before the
    smoothed minimum, so a spike after the minimum (the blow-up) can never carry the suggestion.
    """
    check_method(method)
    lo, hi = SKIP_START, len(lrs) - SKIP_END
    if hi - lo < 3:
        return None
    ys = smoothed[lo:hi]
    end = lo + min(range(len(ys)), key=ys.__getitem__) + 1  # up to and including the minimum
    xs, ys = [math.log(lr) for lr in lrs[lo:end]], smoothed[lo:end]
    if len(xs) < 3:
        return None
    if method == "steepest":
        slopes = [(ys[i + 1] - ys[i - 1]) / (xs[i + 1] - xs[i - 1]) for i in range(1, len(xs) - 1)]
        return lrs[lo + 1 + min(range(len(slopes)), key=slopes.__getitem__)]
    # valley: the longest strictly falling stretch ending at or before the minimum
    best_start, best_len, start = 0, 0, 0
    for i in range(1, len(ys)):
        if ys[i] >= ys[i - 1]:
            start = i
        if i - start > best_len:
            best_start, best_len = start, i - start
    if best_len == 0:
        return None
    return lrs[lo + best_start + round(best_len * 2 / 3)]


def centred_mean(values: list[float], window: int) -> list[float]:
    """Moving average over ``window`` points centred on each point (fewer at the two ends): unlike
    the running average, it does not lag, so a feature of the curve stays at its own LR."""
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def fall_bounds(lrs: list[float], losses: list[float]) -> tuple[float | None, float | None, str | None]:
    """(LRMIN, LRMAX, note) read off the fall of the loss: LRMIN where the centred average has done
    ``FALL_FRACTION`` of its fall from the starting level (and stays past it down to the lowest
    level), LRMAX where it first comes within
    ``FALL_FRACTION`` of the fall of its lowest level. None for both, with the reason as the note,
    when the loss does not fall clearly; a note also when the lowest level is the sweep's end
    (the loss was still falling, so LRMAX may lie beyond the sweep)."""
    n = len(losses)
    if n < 10:
        return None, None, f"{n} iterations are too few to read a fall of the loss"
    window = max(5, n // 20)  # about 5% of the sweep
    curve = centred_mean(losses, window)
    low = min(range(n), key=curve.__getitem__)
    fall = curve[0] - curve[low]
    # The noise of the averaged curve: a robust deviation of the raw loss around it (the median
    # absolute residual x 1.4826 estimates a normal spread whatever a blow-up adds at the end).
    residuals = sorted(abs(v - c) for v, c in zip(losses, curve, strict=False))
    noise = 1.4826 * residuals[n // 2] / math.sqrt(window)
    if fall <= FALL_NOISE_RATIO * noise:
        return None, None, (f"the loss does not fall clearly (by {fall:.3g}, noise {noise:.2g}); start lower "
                            f"or sweep longer")
    # The onset: the curve is below the threshold from here down to its lowest level. Taking the
    # first crossing instead would let a dip of noise near the start, where the centred average is
    # over half a window, pass for the fall's beginning (test_the_onset_is_not_a_dip_of_noise).
    threshold = curve[0] - FALL_FRACTION * fall
    onset = low
    while onset > 0 and curve[onset - 1] <= threshold:
        onset -= 1
    lr_min = lrs[onset]
    lr_max = next(lrs[i] for i in range(n) if curve[i] <= curve[low] + FALL_FRACTION * fall)
    note = None
    if low >= n - 1 - window // 2:
        note = "the loss was still falling at the end of the sweep: LRMAX may lie above it; sweep further"
    return lr_min, lr_max, note


def suggest_bounds(lrs: list[float], losses: list[float], smoothed: list[float],
                   method: str = "plateau") -> tuple[float | None, float | None, str | None]:
    """(LRMIN, LRMAX, note): LRMIN by the onset rule of ``fall_bounds``; LRMAX by ``method``."""
    check_method(method)
    lr_min, lr_max, note = fall_bounds(lrs, losses)
    if method != "plateau":
        lr_max = suggest(lrs, smoothed, method)
    if lr_min is not None and lr_max is not None and lr_min >= lr_max:
        lr_min, note = None, f"the loss's onset LR is not below the {method} LRMAX; no LRMIN"
    return lr_min, lr_max, note


@dataclass
class LRFinderResult:
    """One sweep: per iteration LR, raw loss, smoothed loss, batch accuracy; and the suggestion."""

    mode: str
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    accuracies: list[float] = field(default_factory=list)
    suggested_lr_max: float | None = None
    suggested_lr_min: float | None = None
    lr_max_rule: str = "plateau"
    lr_min_rule: str = "onset"
    stopped: str | None = None   # None: ran to end_lr; else why it stopped early
    note: str | None = None      # why a suggestion is missing or may be off

    @property
    def suggested_lr(self) -> float | None:
        """The LRMAX suggestion (the name of the single suggestion of earlier versions)."""
        return self.suggested_lr_max

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plot(self, ax: Any = None) -> Any:
        """Loss against LR (``report.plot_lr_find_loss``): in a notebook, the curve at a glance."""
        from .report import plot_lr_find_loss

        return plot_lr_find_loss(self, ax)

    def figure(self) -> Any:
        """The seed's graph of this sweep (``report.lr_find_figure``)."""
        from .report import lr_find_figure

        return lr_find_figure(self)


def _cycle(batches: Iterable | Callable[[], Iterable]) -> Iterator:
    """Endless batches: a callable is called again for each new pass; an iterable is re-iterated."""
    while True:
        empty = True
        for b in (batches() if callable(batches) else batches):
            empty = False
            yield b
        if empty:
            raise UserError("lr-find: the batch source yielded no batches")


def find_lr(model: torch.nn.Module, batches: Iterable | Callable[[], Iterable],
            optimizer: torch.optim.Optimizer | None = None, *, mode: str = "exp", start_lr: float | None = None,
            end_lr: float | None = None, num_iter: int = 100,
            smooth: float = 0.05, diverge: float = 4.0, method: str = "plateau", patience: int | None = None,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
            autocast: Any = None, progress: Callable[[int, float, float], None] | None = None,
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
            scaler: torch.amp.GradScaler | None = None) -> LRFinderResult:
    """Run an LR range test on ``model`` and restore it afterwards, bit for bit.

    ``batches``: (inputs, targets) pairs already on the model's device, as an iterable (re-iterated
    when exhausted) or a function returning a fresh pass. ``optimizer``: defaults to SGD with
    momentum 0.9; its LR is overwritten every iteration. ``autocast``: a context-manager factory
    (for example ``lambda: torch.autocast("cpu", torch.bfloat16)``). ``progress(i, lr, loss)`` is
    called after each iteration. ``reduce``: maps each step's loss to the value recorded (under
    torchrun, the mean over ranks, so that every rank stops at the same iteration). ``patience``:
    how many iterations in a row the smoothed loss must stay above ``diverge`` times its best
    before the sweep stops (default: 2% of ``num_iter``, at least 3), so that a spike the network
    recovers from, as early in a fast linear sweep, does not end it. ``scaler``: fp16 loss scaling
    (each iteration is ``step.train_step``, the training loop's own step).
    """
    lo, hi = DEFAULT_RANGES.get(mode, DEFAULT_RANGES["exp"])  # an unknown mode is refused just below
    start_lr = lo if start_lr is None else start_lr
    end_lr = hi if end_lr is None else end_lr
    check_sweep(mode, start_lr, end_lr, num_iter, smooth, diverge, patience)
    check_method(method)  # before the sweep, not after it
    patience = max(3, round(0.02 * num_iter)) if patience is None else patience
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=start_lr, momentum=0.9)
    # The one saved copy: deep copies, since state_dict() returns references to the live tensors.
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_scaler = copy.deepcopy(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None
    was_training = model.training
    lrs, losses, accs, smoothed = [], [], [], []
    stopped, best, avg, above = None, math.inf, 0.0, 0
    source = _cycle(batches)
    try:
        model.train()
        for i, lr in enumerate(lr_sweep(mode, start_lr, end_lr, num_iter)):
            inputs, targets = next(source)
            loss, logits = train_step(model, optimizer, inputs, targets, lr, scaler=scaler, autocast=autocast,
                                      loss_fn=loss_fn)
            value = (reduce(loss) if reduce else loss).item()  # the one host sync per iteration
            if not math.isfinite(value):
                stopped = f"loss not finite at LR {lr:.3g}"
                break
            avg = (1 - smooth) * avg + smooth * value
            s = avg / (1 - (1 - smooth) ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(s)
            if logits.ndim == 2 and targets.ndim == 1:  # kept on the device: read once, after the sweep
                accs.append((logits.argmax(1) == targets).float().mean())
            if progress:
                progress(i, lr, value)
            best = min(best, s)
            above = above + 1 if s > diverge * best else 0
            if above >= patience:
                stopped = f"smoothed loss above {diverge:g} x its best for {patience} iterations, at LR {lr:.3g}"
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        if saved_scaler is not None and scaler is not None:
            scaler.load_state_dict(saved_scaler)
        model.train(was_training)
    accuracies = torch.stack(accs).tolist() if accs else []
    lr_min, lr_max, note = suggest_bounds(lrs, losses, smoothed, method)
    return LRFinderResult(mode, lrs, losses, smoothed, accuracies[:len(lrs)], lr_max, lr_min, method, "onset",
                          stopped, note)



def write_lr_find(results: dict[str, LRFinderResult], out_dir: str | Path) -> list[Path]:
    """lr_find_<mode>.png for each sweep and lr_find.json keyed by mode; returns the paths written."""
    from .files import atomic_write
    from .report import lr_find_figure, save_png
    from .run_folder import LR_FIND_JSON, LR_FIND_PNGS

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for mode, result in results.items():
        save_png(lr_find_figure(result), out_dir / LR_FIND_PNGS[mode])
        written.append(out_dir / LR_FIND_PNGS[mode])
    atomic_write(out_dir / LR_FIND_JSON, json.dumps({m: r.to_dict() for m, r in results.items()}, indent=1) + "\n")
    return [*written, out_dir / LR_FIND_JSON]


# The sweep each ``auto`` setting is read from. LRMAX: the linear sweep, Smith's One Cycle test, its
# plateau rule. LRMIN: the onset on the exponential sweep, the one that sees small LRs: the linear
# sweep moves 0.0017 an iteration from 1e-4 and read LRMIN 0.036 on the seed's recipe, 360 times the
# seed's 1e-4, and that One Cycle scored a point less (benchmarks/results/README.md); the
# exponential sweep has 16 iterations a decade from 1e-5. Fixed from that principle and synthetic
# curves (test_lr_finder), before any 24-epoch run of the rule.
AUTO_SWEEPS = {"lr_max": "linear", "lr_min": "exp"}


def sweep_iterations(mode: str, steps_per_epoch: int, epochs: float | None = None, num_iter: int | None = None) -> int:
    """A sweep's length: ``num_iter`` when given, else ``epochs`` (default: the mode's) of the
    recipe's batches."""
    if num_iter is not None:
        return num_iter
    return max(1, round((DEFAULT_EPOCHS[mode] if epochs is None else epochs) * steps_per_epoch))


def auto_settings(find_lr_max: bool, find_lr_min: bool) -> list[str]:
    """The settings a run with ``auto`` ones reads from range tests: ``lr_max`` and/or ``lr_min``."""
    return [name for name, on in (("lr_max", find_lr_max), ("lr_min", find_lr_min)) if on]


def auto_modes(find_lr_max: bool, find_lr_min: bool) -> list[str]:
    """The sweeps a run with ``auto`` settings runs first (``AUTO_SWEEPS``), in ``MODES`` order."""
    wanted = {AUTO_SWEEPS[name] for name in auto_settings(find_lr_max, find_lr_min)}
    return [mode for mode in MODES if mode in wanted]


def lr_range_test(recipe: Recipe | str | Path | None, data: LabelledImages, modes: Sequence[str] = ("exp",),
                  progress: bool = True, *, epochs: float | None = None, num_iter: int | None = None,
                  **sweep: Any) -> dict[str, LRFinderResult]:
    """The LR range test on the recipe's model, augmented batches, optimizer, loss scaling and
    precision (``recipe``: a Recipe, a shipped recipe's name or a TOML file's path; None: the seed's).

    Each sweep lasts ``num_iter`` iterations, or ``epochs`` epochs of the recipe's batches (default:
    ``DEFAULT_EPOCHS`` of its mode). ``sweep``: the other ``find_lr`` settings (start_lr, end_lr,
    smooth, diverge, method, patience).
    """
    recipe = as_recipe(recipe)
    with freed_memory_kept():
        return _sweeps(setup_run(recipe, data, init_distributed(recipe.device)), modes, progress, epochs=epochs,
                       num_iter=num_iter, **sweep)


def _sweeps(setup: RunSetup, modes: Sequence[str] = ("exp",), progress: bool = True, *,
               epochs: float | None = None, num_iter: int | None = None, **sweep: Any) -> dict[str, LRFinderResult]:
    """The sweeps of ``lr_range_test`` on a run's setup (whose weights and optimizer it leaves as they were)."""
    dist = setup.dist
    # Under torchrun every rank must see the same loss, or their stopping decisions would differ.
    reduce = (lambda t: all_reduce_sum(t.clone(), dist) / dist.world) if dist.world > 1 else None
    results = {}
    for mode in modes:
        iterations = sweep_iterations(mode, setup.steps_per_epoch, epochs, num_iter)
        with tqdm(total=iterations, desc=f"lr-find {mode}", leave=False, disable=not (progress and dist.main),
                  unit="it") as bar:
            results[mode] = find_lr(setup.step_model, setup.epoch, setup.optimizer, mode=mode,
                                    autocast=setup.autocast, reduce=reduce, loss_fn=setup.loss_fn,
                                    scaler=setup.scaler, progress=partial(_show_sweep, bar), num_iter=iterations,
                                    **sweep)
    return results


def _show_sweep(bar: Any, iteration: int, lr: float, loss: float) -> None:
    bar.update()
    bar.set_postfix(lr=f"{lr:.3g}", loss=f"{loss:.3f}")


def find_lr_bounds(setup: RunSetup, find_lr_max: bool, find_lr_min: bool, folder: Path | None = None,
                   progress: bool = True) -> tuple[Recipe, dict[str, Any]]:
    """Run the range tests the wanted settings are read from (``AUTO_SWEEPS``) on ``setup`` and put
    the found LRMAX and/or LRMIN into its recipe; returns the new recipe and how the values were
    found (for summary.json). The graphs and lr_find.json go into ``folder``."""
    wanted = auto_settings(find_lr_max, find_lr_min)
    results = _sweeps(setup, auto_modes(find_lr_max, find_lr_min), progress=progress)
    if folder:
        write_lr_find(results, folder)
    found_values: dict[str, float] = {}
    for name in wanted:
        result = results[AUTO_SWEEPS[name]]
        value = result.suggested_lr_max if name == "lr_max" else result.suggested_lr_min
        if value is None:
            why = result.note or result.stopped or "no suggestion"
            raise NoLRFound(f"{as_setting(name)} auto: the {result.mode} LR range test found no "
                            f"{name.upper().replace('_', '')} ({why}); set {name} explicitly")
        found_values[name] = value
    # a found LRMIN replaces a LRMIN derived from LRMAX
    changes = {**found_values, **({"lr_min_div": 0.0} if find_lr_min else {})}
    lr_found: dict[str, Any] = dict(found_values)
    for name in wanted:
        result = results[AUTO_SWEEPS[name]]
        lr_found[f"{name}_rule"] = result.lr_max_rule if name == "lr_max" else result.lr_min_rule
        lr_found[f"{name}_sweep"] = result.mode
    lr_found["sweeps"] = {mode: {"iterations": len(r.lrs), "lr_range": [r.lrs[0], r.lrs[-1]], "note": r.note}
                          for mode, r in results.items()}
    if progress and setup.dist.main:
        tqdm.write("lr-find: " + ", ".join(f"{name.upper().replace('_', '')} {found_values[name]:.4g} "
                                           f"({AUTO_SWEEPS[name]} sweep, {lr_found[name + '_rule']} rule)"
                                           for name in wanted))
    try:
        return setup.recipe.replace(**changes), lr_found
    except RecipeError as e:  # e.g. a found LRMIN above the LRMAX given
        raise UserError(f"the LR range test's values do not fit the recipe: {e}") from None
