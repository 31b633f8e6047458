"""What a run leaves behind to look at: curves, the LR schedule, mistakes, the confusion matrix,
Grad-CAM, augmented samples, and report.md that a user can paste into their own README.

Every plot of one panel takes ``ax=None`` and returns the Axes; every picture of several panels
takes ``fig=None`` and returns the Figure (in a notebook, either shows inline as a cell's last
value: ``.figure`` of an Axes). Figures are ``matplotlib.figure.Figure`` objects (the Agg canvas),
so nothing needs a display and nothing is shown.
"""
from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .augment import CIFAR10_NORMALIZATION, Normalization, augment_batch, normalize, pad_reflect
from .data import CLASSES
from .device import eval_batch
from .errors import one_line
from .files import atomic_write
from .recipe import Recipe, as_recipe
from .results import SPLIT_NAMES
from .run_folder import (
    AUGMENT_PNG,
    CONFUSION_PNG,
    CURVES_PNG,
    GRADCAM_PNG,
    LR_FIND_PNGS,
    LR_SCHEDULE_PNG,
    MISCLASSIFIED_PNG,
    REPORT_MD,
)

if TYPE_CHECKING:
    from .lr_finder import LRFinderResult

MISCLASSIFIED = 20
GRADCAM = 8


def new_figure(figsize: tuple[float, float] = (6, 4)) -> Any:
    """A matplotlib Figure on the Agg canvas: no pyplot, no display, nothing shown."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def new_axes(figsize: tuple[float, float] = (6, 4)) -> Any:
    return new_figure(figsize).subplots()


def drawn(text: str) -> str:
    """Text from outside (a file's, a folder's or a class's name) as matplotlib will draw it, as
    itself: on one line (``one_line``), its dollar signs escaped. matplotlib reads the text between
    two of them as a formula: ``a$x_1$`` would lose its underscore, and ``$\\frac$`` raises
    ValueError when the figure is saved, at a run's end, after all its training."""
    return one_line(text).replace("$", "\\$")


def save_png(fig: Any, path: Path) -> None:
    """The figure as a PNG, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())


def plot_loss(history: Sequence[Any], ax: Any = None) -> Any:
    """Train loss per epoch, and the loss on the split each epoch is evaluated on (test or validation)."""
    ax = ax if ax is not None else new_axes()
    epochs = [h.epoch for h in history]
    ax.plot(epochs, [h.train_loss for h in history], "o-", label="train")
    ax.plot(epochs, [h.eval_loss for h in history], "s-", label=SPLIT_NAMES[history[-1].split])
    ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")
    whole_epochs(ax)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def whole_epochs(ax: Any) -> None:
    """Ticks at whole epochs only: a point per epoch, no epoch 1.2."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_accuracy(history: Sequence[Any], ax: Any = None) -> Any:
    """Train accuracy per epoch, and the accuracy on the split each epoch is evaluated on (test or
    validation), its best epoch marked."""
    ax = ax if ax is not None else new_axes()
    epochs = [h.epoch for h in history]
    ax.plot(epochs, [100 * h.train_acc for h in history], "o-", label="train")
    split = SPLIT_NAMES[history[-1].split]
    ax.plot(epochs, [100 * h.eval_acc for h in history], "s-", label=split)
    if all(h.eval_acc_tta is not None for h in history):
        ax.plot(epochs, [100 * h.eval_acc_tta for h in history], "^--", label=f"{split}, flip TTA")
    best = max(history, key=lambda h: h.eval_acc)
    ax.annotate(f"best {100 * best.eval_acc:.2f}%", (best.epoch, 100 * best.eval_acc), textcoords="offset points",
                xytext=(-40, -22), arrowprops={"arrowstyle": "->"})
    ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    whole_epochs(ax)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def plot_curves(history: Sequence[Any], fig: Any = None) -> Any:
    """Loss and accuracy per epoch side by side; returns the figure."""
    fig = fig if fig is not None else new_figure((11, 4))
    left, right = fig.subplots(1, 2)
    plot_loss(history, left)
    plot_accuracy(history, right)
    return fig


def plot_lr_schedule(recipe: Recipe | str | Path | None, steps_per_epoch: int, ax: Any = None) -> Any:
    """The LR of every step of ``recipe`` (a Recipe, a shipped recipe's name or a TOML file's path;
    None: the seed's), the peak marked, with epochs on a second axis; when the momentum cycles, the
    momentum too, on an axis of its own on the right."""
    recipe = as_recipe(recipe)
    ax = ax if ax is not None else new_axes((7, 4))
    cycle = recipe.one_cycle(steps_per_epoch)
    knots = cycle.lr_knots
    # The LR is a straight line between knots (lr_at), so the line through the knots passes through
    # every step's LR, in 3 points rather than one per step (which a recipe and summary.json from
    # elsewhere could make any number). Steps are counted from 1 here: step k * steps_per_epoch is
    # the last batch of epoch k.
    ax.plot([step + 1 for step, _ in knots], [lr for _, lr in knots], color="C2")
    peak_step, peak_lr = max(knots, key=lambda k: k[1])
    ax.plot([peak_step + 1], [peak_lr], "o", color="C3")
    ax.annotate(f"peak LR {peak_lr:g}\nstep {peak_step + 1} (end of epoch {(peak_step + 1) / steps_per_epoch:g})",
                (peak_step + 1, peak_lr), textcoords="offset points", xytext=(12, -30))
    title = f"One Cycle schedule: LRMIN {recipe.lr_min:g}, LRMAX {recipe.lr_max:g}"
    if cycle.momentum_knots is not None:
        right = ax.twinx()
        right.plot([step + 1 for step, _ in cycle.momentum_knots], [m for _, m in cycle.momentum_knots], "--",
                   color="C0")
        right.set_ylabel("momentum (dashed)", color="C0")
        title += f"\nmomentum {recipe.momentum:g} at LRMIN, {recipe.momentum_at_peak:g} at LRMAX"
    ax.set(title=title, xlabel="step (LR set before the step)", ylabel="learning rate")
    ax.grid(alpha=0.3)
    sec = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
    sec.set_xlabel("epoch")
    return ax


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """Counts, rows the true class and columns the predicted one."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2).view(num_classes, num_classes)


DATASET_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "folder": "A folder of images"}
# Beyond this many classes the cells are too small to hold their counts; the colours still show them.
CONFUSION_COUNTS_UP_TO = 20


def class_accuracies(cm: torch.Tensor) -> list[float]:
    """Each class's accuracy from the confusion matrix ``cm`` (rows: true class): its diagonal count
    over its row's, 0 for a class without images."""
    return [int(cm[i, i]) / max(int(cm[i].sum()), 1) for i in range(len(cm))]


def class_rows(cm: torch.Tensor, classes: Sequence[str], split: str = "test") -> list[list[str]]:
    """The confusion matrix ``cm`` (rows: true class) of the ``split`` images (its name in words:
    test, validation) as a table, its header first: a row a class with its images, its accuracy in
    % and the class its images are most often taken for (the share of its images in brackets; "-"
    where none was mistaken)."""
    table = [["class", f"{split} images", "accuracy %", "most often taken for"]]
    for i, (name, accuracy) in enumerate(zip(classes, class_accuracies(cm), strict=True)):
        images = int(cm[i].sum())
        wrong = cm[i].clone()
        wrong[i] = 0
        j = int(wrong.argmax())
        taken = f"{classes[j]} ({100 * int(wrong[j]) / images:.1f}%)" if int(wrong[j]) else "-"
        table.append([name, str(images), f"{100 * accuracy:.2f}" if images else "-", taken])
    return table


def model_table(recipe: Recipe) -> str:
    """The summary table of the network ``recipe`` trains (the seed's, with as many outputs as its
    data has classes), and its receptive field table."""
    from .model import ResNet9
    from .summary import summarize

    summary = summarize(ResNet9(num_classes=recipe.num_classes))
    return summary.table() + "\n\n" + summary.receptive_field_table()


def plot_confusion(cm: torch.Tensor, classes: Sequence[str] = CLASSES, ax: Any = None) -> Any:
    """The confusion matrix with per-class accuracy in the row labels, and counts in the cells up to
    ``CONFUSION_COUNTS_UP_TO`` classes (the figure and its labels scale with the classes)."""
    n = len(classes)
    side = 6.5 if n <= CONFUSION_COUNTS_UP_TO else min(6.5 + 0.12 * n, 30.0)
    ax = ax if ax is not None else new_axes((side + 1, side))
    ax.imshow(cm.numpy(), cmap="Blues")
    acc = class_accuracies(cm)
    font = 8 if n <= CONFUSION_COUNTS_UP_TO else max(3, min(8, 600 / n))
    names = [drawn(c) for c in classes]
    ax.set_xticks(range(n), names, rotation=45 if n <= CONFUSION_COUNTS_UP_TO else 90, ha="right", fontsize=font)
    ax.set_yticks(range(n), [f"{c} ({100 * a:.1f}%)" for c, a in zip(names, acc, strict=False)], fontsize=font)
    high = cm.max().item() / 2
    for i in range(n if n <= CONFUSION_COUNTS_UP_TO else 0):
        for j in range(n):
            ax.text(j, i, str(cm[i, j].item()), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > high else "black")
    ax.set(title="Confusion matrix (test set)", xlabel="predicted class", ylabel="true class (accuracy)")
    return ax


@torch.no_grad()
def predict_probabilities(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 0,
                          precision: str = "fp32", channels_last: bool = True,
                          normalization: Normalization = CIFAR10_NORMALIZATION) -> torch.Tensor:
    """Softmax probabilities [N, classes] (fp32, on the CPU) for uint8 NCHW images, computed in
    ``precision`` as evaluation computes them (``evaluation.logits_of``), ``batch_size`` at a time
    (0: the device's, ``device.eval_batch``)."""
    from .evaluation import logits_of

    model.eval()
    device = next(model.parameters()).device
    batch_size = eval_batch(batch_size, device)
    out = [F.softmax(logits_of(model, images[i:i + batch_size].to(device), precision, channels_last,
                               normalization), 1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def grad_cam(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor,
             classes: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM maps [N, H, W] in [0, 1], at the input's size, for ``classes`` (default: predicted).

    The channel weights are the spatial means of d(score)/d(activation) at ``layer``'s output; the
    map is the ReLU of the weighted sum of its channels, upsampled bilinearly and scaled per image.
    """
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: captured.append(o))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # The input asks for gradients so that the activations carry them even when the
            # weights do not (a frozen model, such as a weight average).
            logits = model(x.detach().requires_grad_(True))
            act = captured[0]
            classes = logits.argmax(1) if classes is None else classes
            score = logits.gather(1, classes[:, None]).sum()
            grads, = torch.autograd.grad(score, act)
    finally:
        handle.remove()
        model.train(was_training)
    cam = F.relu((grads.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]
    return (cam / peak).clamp(0, 1).detach()


def to_display(x: torch.Tensor, normalization: Normalization = CIFAR10_NORMALIZATION) -> torch.Tensor:
    """Normalised float NCHW back to real colours, [N, H, W, 3] in [0, 1]."""
    mean = torch.tensor(normalization[0], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(normalization[1], device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def image_grid(images: torch.Tensor, titles: Sequence[str], ncols: int = 5, title: str = "",
               overlays: torch.Tensor | None = None, fig: Any = None) -> Any:
    """A figure (``fig``, or a new one) of [N, H, W, 3] images in [0, 1] with a caption each (and
    optional heat maps); returns the figure."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig = fig if fig is not None else new_figure((2.3 * ncols, 2.5 * nrows + 0.4))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k].numpy(), interpolation="nearest")
            if overlays is not None:
                ax.imshow(overlays[k].numpy(), cmap="jet", alpha=0.45, interpolation="bilinear", vmin=0, vmax=1)
            ax.set_title(titles[k], fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def most_confident_mistakes(probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Indices of the wrongly classified images, the most confident mistake first."""
    confidence, predicted = probabilities.max(1)
    wrong = (predicted != labels.cpu()).nonzero()[:, 0]
    return wrong[confidence[wrong].argsort(descending=True)]


def plot_misclassified(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, count: int = MISCLASSIFIED,
                       classes: Sequence[str] = CLASSES, probabilities: torch.Tensor | None = None,
                       fig: Any = None, normalization: Normalization = CIFAR10_NORMALIZATION) -> Any:
    """The ``count`` most confident mistakes of ``model`` on uint8 ``images``, in real colours, with
    true class, predicted class and confidence; returns the figure (``probabilities``: the model's,
    when already computed)."""
    probs = probabilities if probabilities is not None else predict_probabilities(
        model, images, normalization=normalization)
    confidence, predicted = probs.max(1)
    labels = labels.cpu()
    wrong = most_confident_mistakes(probs, labels)
    shown = wrong[:count]
    real = images[shown.to(images.device)].float().div(255).permute(0, 2, 3, 1).cpu()
    return image_grid(real, [f"true: {drawn(classes[int(labels[i])])}\npred: {drawn(classes[int(predicted[i])])} "
                             f"({100 * confidence[i]:.0f}%)"
                             for i in shown.tolist()],
                      title=f"Misclassified test images ({len(wrong)} of {len(labels)}), most confident first", fig=fig)


def plot_gradcam(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, count: int = GRADCAM,
                 classes: Sequence[str] = CLASSES, probabilities: torch.Tensor | None = None, fig: Any = None,
                 normalization: Normalization = CIFAR10_NORMALIZATION) -> Any:
    """Grad-CAM at the last residual block (layer 3) for the ``count`` most confident mistakes, over
    the images; returns the figure."""
    probs = probabilities if probabilities is not None else predict_probabilities(
        model, images, normalization=normalization)
    predicted = probs.argmax(1)
    labels = labels.cpu()
    shown = most_confident_mistakes(probs, labels)[:count]
    titles = [f"pred: {drawn(classes[int(predicted[i])])}\ntrue: {drawn(classes[int(labels[i])])}"
              for i in shown.tolist()]
    return gradcam_grid(model, images[shown.to(images.device)], titles, normalization, fig)


def gradcam_grid(model: torch.nn.Module, images: torch.Tensor, titles: Sequence[str],
                 normalization: Normalization = CIFAR10_NORMALIZATION, fig: Any = None) -> Any:
    """uint8 NCHW ``images``, each captioned by its ``titles`` (names from outside ``drawn``) and
    overlaid with its Grad-CAM for the class the model predicts, at the last residual block (layer
    3; another model's last child); returns the figure."""
    from .model import ResNet9

    x = normalize(images.to(next(model.parameters()).device), normalization=normalization)
    layer = model.layer3 if isinstance(model, ResNet9) else list(model.children())[-1]
    cams = grad_cam(model, layer, x).cpu()
    return image_grid(to_display(x, normalization), titles, ncols=4,
                      title="Grad-CAM at the last residual block (layer 3), for the predicted class",
                      overlays=cams, fig=fig)


def augmentation_steps(recipe: Recipe) -> list[str]:
    """The recipe's transforms in the order they run, as the report names them."""
    return [name for name, on in ((f"RandomCrop 32 (after reflect-padding {recipe.crop_padding})", recipe.crop),
                                  ("FlipLR", recipe.flip),
                                  (f"CutOut {recipe.cutout_size}x{recipe.cutout_size}", recipe.cutout)) if on]


def plot_augmentation(recipe: Recipe | str | Path | None, train_images: torch.Tensor, count: int = 20,
                      fig: Any = None) -> Any:
    """The first ``count`` training images after the augmentation of ``recipe`` (as
    ``plot_lr_schedule`` takes it), as the network sees them (drawn from the recipe's seed);
    returns the figure."""
    recipe = as_recipe(recipe)
    g = torch.Generator(device=train_images.device).manual_seed(recipe.seed)
    sample = pad_reflect(train_images[:count], recipe.padding)
    aug = augment_batch(sample, crop=recipe.crop, padding=recipe.padding, flip=recipe.flip,
                        cutout_size=recipe.hole_size, generator=g, normalization=recipe.normalization)
    return image_grid(to_display(aug, recipe.normalization), [""] * len(aug),
                      title="Training images after " + ", ".join(augmentation_steps(recipe) or ["nothing"]), fig=fig)


# The LR range test's graphs (``lr_finder.write_lr_find``, ``LRFinderResult.figure``).


def _mark_suggestions(result: LRFinderResult, ax: Any) -> None:
    if result.suggested_lr_max is not None:
        ax.axvline(result.suggested_lr_max, color="C3", ls="--", lw=1,
                   label=f"LRMAX {result.suggested_lr_max:.3g} ({result.lr_max_rule})")
    if result.suggested_lr_min is not None:
        ax.axvline(result.suggested_lr_min, color="C4", ls=":", lw=1.5,
                   label=f"LRMIN {result.suggested_lr_min:.3g} ({result.lr_min_rule})")


def plot_lr_find_loss(result: LRFinderResult, ax: Any = None) -> Any:
    """Loss (raw and smoothed) against LR, the suggestion marked; returns the Axes, never shows."""
    ax = ax if ax is not None else new_axes()
    ax.plot(result.lrs, result.losses, color="0.7", lw=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    _mark_suggestions(result, ax)
    if result.mode == "exp":
        ax.set_xscale("log")
    lo, hi = min(result.smoothed), result.smoothed[0]
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), max(hi, lo) + 0.6 * (hi - lo + 1e-9))
    ax.set_xlabel("learning rate" + (" (log scale)" if result.mode == "exp" else ""))
    ax.set_ylabel("training loss")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return ax


def plot_lr_increase(result: LRFinderResult, ax: Any = None) -> Any:
    """The LR against iteration: the increase itself; batch accuracy on a second axis."""
    ax = ax if ax is not None else new_axes()
    ax.plot(range(1, len(result.lrs) + 1), result.lrs, color="C2", lw=2, label="learning rate")
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    if result.mode == "exp":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if result.accuracies:
        acc = ax.twinx()
        acc.plot(range(1, len(result.accuracies) + 1), result.accuracies, color="C1", lw=1, alpha=0.8,
                 label="batch accuracy")
        acc.set_ylabel("training accuracy")
        acc.set_ylim(0, 1)
        acc.legend(loc="lower right")
    ax.legend(loc="upper left")
    return ax


def plot_lr_find_accuracy(result: LRFinderResult, ax: Any = None) -> Any:
    """Batch accuracy (raw and centred average) and the smoothed loss against the LR, with the
    suggestions marked: where training stops improving is visible in both curves."""
    from .lr_finder import centred_mean

    ax = ax if ax is not None else new_axes()
    if result.accuracies:
        ax.plot(result.lrs, result.accuracies, color="C1", lw=1, alpha=0.35, label="batch accuracy")
        ax.plot(result.lrs, centred_mean(result.accuracies, max(5, len(result.lrs) // 20)), color="C1", lw=2,
                label="batch accuracy, averaged")
    ax.set_ylim(0, 1)
    ax.set_ylabel("training accuracy")
    ax.set_xlabel("learning rate" + (" (log scale)" if result.mode == "exp" else ""))
    if result.mode == "exp":
        ax.set_xscale("log")
    _mark_suggestions(result, ax)
    ax.grid(alpha=0.3)
    loss = ax.twinx()
    loss.plot(result.lrs, result.smoothed, color="C0", lw=1.5, label="smoothed loss")
    loss.set_ylabel("smoothed loss")
    loss.legend(loc="upper right")
    ax.legend(loc="center right", fontsize="small")
    return ax


def lr_find_figure(result: LRFinderResult) -> Any:
    """The seed's graph: 'Exponential LR' or 'Linear LR', with both panels (the linear one shows
    accuracy and loss against the LR; the exponential one the LR's increase)."""
    fig = new_figure((11, 4.2))
    left, right = fig.subplots(1, 2)
    plot_lr_find_loss(result, left)
    left.set_title("loss against learning rate")
    if result.mode == "linear":
        plot_lr_find_accuracy(result, right)
        right.set_title("batch accuracy and loss against learning rate")
    else:
        plot_lr_increase(result, right)
        right.set_title("exponential increase of the LR")
    note = f", stopped early: {result.stopped}" if result.stopped else ""
    note += f"; {result.note}" if result.note else ""
    fig.suptitle(textwrap.fill(f"{'Exponential' if result.mode == 'exp' else 'Linear'} LR  "
                               f"({len(result.lrs)} iterations{note})", 130))
    return fig


def markdown_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table of ``rows``, the header first; a ``|`` in a cell escaped (it would end the
    cell), and a ``$`` (GitHub reads the text between two as a formula: a class named ``$x_1$``)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|").replace("$", "\\$") for cell in cells) + " |"

    return [line(rows[0]), "| " + " | ".join("---" for _ in rows[0]) + " |", *map(line, rows[1:])]


def write_report(run_dir: str | Path, model: torch.nn.Module, recipe: Recipe, history: Sequence[Any],
                 summary: dict[str, Any], test_images: torch.Tensor, test_labels: torch.Tensor,
                 train_images: torch.Tensor, steps_per_epoch: int, precision: str = "fp32",
                 probabilities: torch.Tensor | None = None) -> dict[str, Any]:
    """Write every picture and report.md into ``run_dir``; return summary.json's contents with the
    per-class accuracy added (the caller writes summary.json: ``RunFolder.write_summary``).
    ``precision``: the run's evaluation's, so that the mistakes and the confusion matrix count what
    the reported accuracy counted. ``probabilities``: the model's on the test images, when the
    final evaluation kept them (``Scores.probabilities``; else one more pass computes them)."""
    run_dir = Path(run_dir)
    save_png(plot_curves(history), run_dir / CURVES_PNG)
    save_png(plot_lr_schedule(recipe, steps_per_epoch).figure, run_dir / LR_SCHEDULE_PNG)

    normalization = recipe.normalization
    classes = [one_line(name) for name in recipe.class_names]  # a folder's name may hold a newline or an escape
    probs = probabilities if probabilities is not None else predict_probabilities(
        model, test_images, recipe.eval_batch_size, precision, recipe.channels_last, normalization)
    cm = confusion_matrix(test_labels.cpu(), probs.argmax(1), len(classes))
    save_png(plot_confusion(cm, classes).figure, run_dir / CONFUSION_PNG)
    save_png(plot_misclassified(model, test_images, test_labels, classes=classes, probabilities=probs),
             run_dir / MISCLASSIFIED_PNG)
    save_png(plot_gradcam(model, test_images, test_labels, classes=classes, probabilities=probs,
                          normalization=normalization), run_dir / GRADCAM_PNG)
    save_png(plot_augmentation(recipe, train_images), run_dir / AUGMENT_PNG)
    steps = augmentation_steps(recipe)

    per_class = dict(zip(recipe.class_names, class_accuracies(cm), strict=True))
    summary = {**summary, "per_class_accuracy": per_class}
    atomic_write(run_dir / REPORT_MD, report_markdown(recipe, history, summary, model_table(recipe), steps, run_dir,
                                                      class_rows(cm, classes)))
    return summary


def _count(n: Any) -> str:
    """A count read from summary.json, with thousands separators; "?" for anything else."""
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "?"


def _extras(summary: dict[str, Any], recipe: Recipe) -> str:
    """The final test accuracy with flip TTA, and without the weight average, when the summary has
    them (with lookahead the trained weights end as the average, unless its BatchNorm statistics
    were recomputed); and the validation split's, with a holdout."""
    text = ""
    if summary.get("final_val_acc") is not None:
        text += (f" On the {_count(summary.get('val_images'))} held-out validation images (the holdout, "
                 f"evaluated each epoch): {100 * summary['final_val_acc']:.2f}%.")
    if summary.get("final_test_acc_tta") is not None:
        text += f" With flip TTA: {100 * summary['final_test_acc_tta']:.2f}%."
    if recipe.trained_ends_as_average:
        text += " These are the weight average's, which lookahead wrote back into the trained weights at the end."
    elif summary.get("final_test_acc_without_ema") is not None:
        text += (f" These are the weight average's; the trained weights alone score "
                 f"{100 * summary['final_test_acc_without_ema']:.2f}%.")
    return text


def report_markdown(recipe: Recipe, history: Sequence[Any], summary: dict[str, Any], table: str,
                    transforms: Sequence[str], run_dir: Path, classes: list[list[str]] | None = None) -> str:
    """A README-style page in the seed's order: model, One Cycle settings, transforms, results (with
    ``classes``, ``class_rows``' table), graphs."""
    best = max(history, key=lambda h: h.eval_acc)
    split = history[-1].split
    found = summary.get("lr_found") or {}

    def origin(name: str) -> str:
        if name not in found:
            return " (set by the recipe)"
        sweep = found.get(name + "_sweep", found.get("sweep"))  # older run folders name one sweep for both
        return f" (found by the {sweep} LR range test, {found[name + '_rule']} rule)"

    momentum = (f"momentum {recipe.momentum:g} at LRMIN to {recipe.momentum_at_peak:g} at LRMAX (cyclical)"
                if recipe.momentum_at_peak else f"momentum {recipe.momentum:g}")
    lines = [
        f"# {DATASET_TITLES.get(recipe.dataset, recipe.dataset)} with the One Cycle policy", "",
        "## Model", "", "```", table, "```", "",
        f"{summary.get('parameters', 6573130):,} parameters.", "",
        "## One Cycle policy", "",
        f"1. Total epochs = {recipe.epochs}",
        f"2. Max at epoch = {recipe.peak_epoch:g}",
        f"3. LRMIN = {recipe.lr_min:g}" + origin("lr_min"),
        f"4. LRMAX = {recipe.lr_max:g}" + origin("lr_max"),
        "5. No annihilation (the last step is at LRMIN)",
        f"6. SGD, {momentum}{' (Nesterov)' if recipe.nesterov else ''}, weight decay {recipe.weight_decay:g}", "",
        "## Transformations in sequence", "",
        *[f"{i}. {t}" for i, t in enumerate(transforms, 1)], "",
        f"### Batch size = {recipe.batch_size}", "",
        "## Accuracy", "",
        f"**{100 * summary['final_test_acc']:.2f}%** on the test set after the last epoch ({recipe.epochs}); "
        f"best {SPLIT_NAMES[split]} accuracy {100 * best.eval_acc:.2f}% in epoch {best.epoch}. Test images: "
        f"{_count(summary.get('test_images'))}. Device: {summary.get('device', '?')}, {summary.get('precision', '?')}."
        + _extras(summary, recipe), "",
        f"| epoch | LR | train loss | train acc | {split} loss | {split} acc |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {h.epoch}{' (best)' if h.epoch == best.epoch else ''} | {h.lr:.5f} | {h.train_loss:.4f} | "
          f"{100 * h.train_acc:.2f}% | {h.eval_loss:.4f} | {100 * h.eval_acc:.2f}% |" for h in history], "",
        *(["### Accuracy by class", "", "On the test set, after the last epoch (no TTA).", "",
           *markdown_table(classes), ""] if classes else []),
        "## Graphs", "",
        f"![Loss and accuracy]({CURVES_PNG})", "", f"![LR schedule]({LR_SCHEDULE_PNG})", "",
    ]
    if (run_dir / LR_FIND_PNGS["exp"]).exists():
        lines += ["### Exponential LR", "", f"![Increasing LR exponentially]({LR_FIND_PNGS['exp']})", ""]
    if (run_dir / LR_FIND_PNGS["linear"]).exists():
        lines += ["### Linear LR", "", f"![Increasing LR linearly]({LR_FIND_PNGS['linear']})", ""]
    lines += ["## Transforms", "", f"![Augmented training images]({AUGMENT_PNG})", "",
              "## Misclassified images", "", f"![Misclassified]({MISCLASSIFIED_PNG})", "",
              "## Confusion matrix", "", f"![Confusion matrix]({CONFUSION_PNG})", "",
              "## Grad-CAM", "", f"![Grad-CAM]({GRADCAM_PNG})", ""]
    return "\n".join(lines)
