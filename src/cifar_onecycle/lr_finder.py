"""The LR range test (Leslie Smith, 2015): train briefly while the LR grows, and read the loss curve.

``find_lr`` works on any ``nn.Module`` and any source of (inputs, targets) batches. It raises the LR
every iteration (exponentially or linearly), records the raw loss, its bias-corrected exponential
moving average and the batch accuracy, stops once the smoothed loss exceeds ``diverge`` times its
best (or the loss is not finite), and finally puts the model's and the optimizer's state back
exactly as they were: one saved copy taken before the sweep, no per-step copies.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from .errors import UserError

MODES = ("exp", "linear")
# Exponential sweeps span orders of magnitude; a linear axis is readable over about one, so the
# linear default covers the neighbourhood of this network's usual LRMAX (the seed chose 0.2).
DEFAULT_RANGES = {"exp": (1e-5, 10.0), "linear": (0.02, 0.5)}
METHODS = ("valley", "steepest")
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
                diverge: float = 4.0) -> None:
    """Refuse impossible sweep settings with a one-line message."""
    if mode not in MODES:
        raise UserError(f"lr-find: unknown mode {mode!r}; use one of {', '.join(MODES)} (or both)")
    if not (math.isfinite(start_lr) and start_lr > 0):
        raise UserError(f"lr-find: start LR must be > 0, got {start_lr}")
    if not (math.isfinite(end_lr) and end_lr > start_lr):
        raise UserError(f"lr-find: end LR {end_lr} must be above the start LR {start_lr}")
    if num_iter < 10:
        raise UserError(f"lr-find: num-iter must be >= 10, got {num_iter}")
    if not 0 < smooth <= 1:
        raise UserError(f"lr-find: smooth must lie in (0, 1], got {smooth}")
    if not diverge > 1:
        raise UserError(f"lr-find: diverge must be > 1, got {diverge}")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"lr-find: unknown suggestion method {method!r}; use one of {', '.join(METHODS)}")


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


@dataclass
class LRFinderResult:
    """One sweep: per iteration LR, raw loss, smoothed loss, batch accuracy; and the suggestion."""

    mode: str
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    accuracies: list[float] = field(default_factory=list)
    suggested_lr: float | None = None
    method: str = "valley"
    stopped: str | None = None   # None: ran to end_lr; else why it stopped early

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plot(self, ax: Any = None) -> Any:
        """Loss (raw and smoothed) against LR, the suggestion marked; returns the Axes, never shows."""
        from .report import new_axes

        ax = ax if ax is not None else new_axes()
        ax.plot(self.lrs, self.losses, color="0.7", lw=1, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", lw=2, label="smoothed loss")
        if self.suggested_lr is not None:
            ax.axvline(self.suggested_lr, color="C3", ls="--", lw=1,
                       label=f"suggested LR {self.suggested_lr:.3g} ({self.method})")
        if self.mode == "exp":
            ax.set_xscale("log")
        lo, hi = min(self.smoothed), self.smoothed[0]
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), max(hi, lo) + 0.6 * (hi - lo + 1e-9))
        ax.set_xlabel("learning rate" + (" (log scale)" if self.mode == "exp" else ""))
        ax.set_ylabel("training loss")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
        return ax

    def plot_lr(self, ax: Any = None) -> Any:
        """The LR against iteration: the increase itself; batch accuracy on a second axis."""
        from .report import new_axes

        ax = ax if ax is not None else new_axes()
        ax.plot(range(1, len(self.lrs) + 1), self.lrs, color="C2", lw=2, label="learning rate")
        ax.set_xlabel("iteration")
        ax.set_ylabel("learning rate")
        if self.mode == "exp":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if self.accuracies:
            acc = ax.twinx()
            acc.plot(range(1, len(self.accuracies) + 1), self.accuracies, color="C1", lw=1, alpha=0.8,
                     label="batch accuracy")
            acc.set_ylabel("training accuracy")
            acc.set_ylim(0, 1)
            acc.legend(loc="lower right")
        ax.legend(loc="upper left")
        return ax

    def figure(self) -> Any:
        """The seed's graph: 'Exponential LR' or 'Linear LR', with both panels."""
        from .report import new_figure

        fig = new_figure((11, 4.2))
        left, right = fig.subplots(1, 2)
        self.plot(left)
        left.set_title("loss against learning rate")
        self.plot_lr(right)
        right.set_title(f"{'exponential' if self.mode == 'exp' else 'linear'} increase of the LR")
        note = f", stopped early: {self.stopped}" if self.stopped else ""
        fig.suptitle(f"{'Exponential' if self.mode == 'exp' else 'Linear'} LR  "
                     f"({len(self.lrs)} iterations{note})")
        return fig


def _cycle(batches: Iterable | Callable[[], Iterable]) -> Iterator:
    """Endless batches: a callable is called again for each new pass; an iterable is re-iterated."""
    while True:
        empty = True
        for b in (batches() if callable(batches) else batches):
            empty = False
            yield b
        if empty:
            raise UserError("lr-find: the batch source yielded no batches")


def find_lr(model: torch.nn.Module, batches: Iterable | Callable[[], Iterable], optimizer: torch.optim.Optimizer | None = None,
            *, mode: str = "exp", start_lr: float | None = None, end_lr: float | None = None, num_iter: int = 100,
            smooth: float = 0.05, diverge: float = 4.0, method: str = "valley",
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
            autocast: Any = None, progress: Callable[[int, float, float], None] | None = None,
            reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LRFinderResult:
    """Run an LR range test on ``model`` and restore it afterwards, bit for bit.

    ``batches``: (inputs, targets) pairs already on the model's device, as an iterable (re-iterated
    when exhausted) or a function returning a fresh pass. ``optimizer``: defaults to SGD with
    momentum 0.9; its LR is overwritten every iteration. ``autocast``: a context-manager factory
    (for example ``lambda: torch.autocast("cpu", torch.bfloat16)``). ``progress(i, lr, loss)`` is
    called after each iteration. ``reduce``: maps each step's loss to the value recorded (under
    torchrun, the mean over ranks, so that every rank stops at the same iteration).
    """
    lo, hi = DEFAULT_RANGES.get(mode, DEFAULT_RANGES["exp"])  # an unknown mode is refused just below
    start_lr = lo if start_lr is None else start_lr
    end_lr = hi if end_lr is None else end_lr
    check_sweep(mode, start_lr, end_lr, num_iter, smooth, diverge)
    check_method(method)  # before the sweep, not after it
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=start_lr, momentum=0.9)
    # The one saved copy: deep copies, since state_dict() returns references to the live tensors.
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    lrs, losses, accs, smoothed = [], [], [], []
    stopped, best, avg = None, math.inf, 0.0
    source = _cycle(batches)
    try:
        model.train()
        for i, lr in enumerate(lr_sweep(mode, start_lr, end_lr, num_iter)):
            x, y = next(source)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast() if autocast else contextlib.nullcontext():
                out = model(x)
                loss = loss_fn(out.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = (reduce(loss.detach()) if reduce else loss).item()  # the one host sync per iteration
            if not math.isfinite(value):
                stopped = f"loss not finite at LR {lr:.3g}"
                break
            avg = (1 - smooth) * avg + smooth * value
            s = avg / (1 - (1 - smooth) ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(s)
            if out.ndim == 2 and y.ndim == 1:  # kept on the device: read once, after the sweep
                accs.append((out.argmax(1) == y).float().mean())
            if progress:
                progress(i, lr, value)
            best = min(best, s)
            if s > diverge * best:
                stopped = f"smoothed loss above {diverge:g} x its best at LR {lr:.3g}"
                break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        model.train(was_training)
    accuracies = torch.stack(accs).tolist() if accs else []
    return LRFinderResult(mode, lrs, losses, smoothed, accuracies[:len(lrs)], suggest(lrs, smoothed, method),
                          method, stopped)



def write_lr_find(results: dict[str, LRFinderResult], out_dir: str | Path) -> list[Path]:
    """lr_find_<mode>.png for each sweep and lr_find.json keyed by mode; returns the paths written."""
    from .checkpoint import atomic_write
    from .report import save_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for mode, result in results.items():
        save_png(result.figure(), out_dir / f"lr_find_{mode}.png")
        written.append(out_dir / f"lr_find_{mode}.png")
    atomic_write(out_dir / "lr_find.json", json.dumps({m: r.to_dict() for m, r in results.items()}, indent=1) + "\n")
    return [*written, out_dir / "lr_find.json"]
