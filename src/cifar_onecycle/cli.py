"""The command line: a thin layer over the Python API. Only this module prints and exits.

Errors a user can fix are one line on stderr with exit code 2 (3 for a diverged run); ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from . import __version__
from .distributed import launch_rank, shutdown
from .errors import UserError, one_line
from .files import FolderLock, writable_folder
from .recipe import MAX_CLASSES, Recipe, check_seed_range, load_recipe

if TYPE_CHECKING:
    import torch

    from .data import LabelledImages
    from .run_plan import SweepDryRun

PROG = "cifar-onecycle"


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (not the usage block) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _float_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: give a number or 'auto'") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None


def _add_recipe_flags(p: argparse.ArgumentParser, auto_lr: bool = False) -> None:
    g = p.add_argument_group("recipe (each overrides --recipe and the seed's defaults)")
    g.add_argument("--recipe", metavar="NAME|FILE.toml",
                   help="recipe to start from: seed (the default), dawnbench, best, quick (a few minutes on a CPU), "
                        "or a TOML file")
    for f in dataclasses.fields(Recipe):
        if not f.metadata["flag"]:  # recorded from the data, not set by hand
            continue
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": f"{f.metadata['help']} (default: {f.default})"}
        if f.type == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in ("lr_max", "lr_min") and auto_lr:
            from .lr_finder import AUTO_SWEEPS

            sweep = {"exp": "exponential"}.get(AUTO_SWEEPS[f.name], AUTO_SWEEPS[f.name])
            kw["help"] = (f"{f.metadata['help']}, or 'auto': the {sweep} LR range test's suggestion "
                          f"(default: {f.default})")
            g.add_argument(flag, type=_float_or_auto, metavar="LR|auto", **kw)
        else:
            choices = f.metadata.get("choices")
            g.add_argument(flag, type={"int": int, "float": float, "str": str}[str(f.type)], choices=choices,
                           metavar=None if choices else f.name.upper().split("_")[-1], **kw)


def _add_data_flags(p: argparse.ArgumentParser, default: str = "./data") -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz (cifar-100-python/ or "
                        "cifar-100-python.tar.gz; with --dataset folder, train/<class>/ and test/<class>/) "
                        f"(default: {default})")
    p.add_argument("--no-download", action="store_true", help="never use the network for the data set")


def _add_device_flags(p: argparse.ArgumentParser, precision_reproduces: str = "") -> None:
    """--device, and with ``precision_reproduces`` --precision, whose default is the run's own."""
    p.add_argument("--device", choices=Recipe.choices("device"), default="auto",
                   help="auto: CUDA when there is one, else the CPU (default: auto)")
    if precision_reproduces:
        p.add_argument("--precision", choices=Recipe.choices("precision"),
                       help=f"autocast's arithmetic (default: the run's own recipe setting, so that "
                            f"{precision_reproduces})")


def build_parser() -> argparse.ArgumentParser:
    from .lr_finder import METHODS, MODES

    parser = Parser(prog=PROG, description="Train the EVA6 Session 9 ResNet on CIFAR-10 (or CIFAR-100, or a folder "
                                           "of your images) with the One Cycle policy.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train_cmd = sub.add_parser("train", parents=[common], help="train with a recipe (default: the seed's)")
    _add_recipe_flags(train_cmd, auto_lr=True)
    _add_data_flags(train_cmd, "./data; with --resume, the run's own")
    train_cmd.add_argument("--out", metavar="RUN_DIR", help="run folder (default: runs/<timestamp>)")
    train_cmd.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train_cmd.add_argument("--resume", metavar="RUN_DIR",
                           help="continue the run (or the runs of --seeds) in RUN_DIR from its checkpoint, with "
                                "its recipe")
    train_cmd.add_argument("--seeds", type=int, metavar="N",
                           help="train N times with seeds --seed .. --seed+N-1, each in RUN_DIR/seed<k>/, and "
                                "write the mean, std, standard error, min and max of the final test accuracy (with and "
                                "without flip TTA) to RUN_DIR/summary.json, and a table of them to RUN_DIR/seeds.md")
    train_cmd.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    train_cmd.add_argument("--no-checkpoint", action="store_true",
                           help="write no checkpoint.pt (a run that only measures: it cannot be resumed, and a "
                                "stop signal loses it)")
    train_cmd.add_argument("--keep-checkpoint", action="store_true",
                           help="keep checkpoint.pt when the run ends (removed by default: it serves to resume an "
                                "unfinished run, and is 2 to 3 times the size of model.safetensors)")
    train_cmd.add_argument("--no-report", action="store_true", help="skip the pictures and report.md at the end")
    train_cmd.add_argument("--tensorboard", action="store_true",
                           help="also log each epoch's scalars to RUN_DIR/tensorboard "
                                "(pip install 'cifar-onecycle[tensorboard]')")
    train_cmd.add_argument("--dry-run", action="store_true",
                           help="train nothing and write nothing: load the data, set the run up, time a few of its "
                                "steps and one evaluation batch, and print the device, precision, splits, steps, "
                                "One Cycle knots and about how long the run would take")

    evaluate_cmd = sub.add_parser("evaluate", parents=[common],
                                  help="accuracy and loss of a trained model on the test set or its validation split")
    evaluate_cmd.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS")
    evaluate_cmd.add_argument("--dataset", choices=Recipe.choices("dataset"),
                              help="score the model on the test images of this source, whose classes must be the "
                                   "model's (default: the one it was trained on)")
    _add_data_flags(evaluate_cmd, "the folder the run was trained on, else ./data")
    _add_device_flags(evaluate_cmd, "the run's own test accuracy is reproduced")
    evaluate_cmd.add_argument("--split", choices=("test", "val"), default="test",
                              help="the test images (default), or val: the training images the run held out "
                                   "(its recipe's holdout), read from the same training set, to choose an "
                                   "evaluation setting such as --tta-translate without the test set")
    evaluate_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate_cmd.add_argument("--tta", action="store_true",
                              help="test-time augmentation: average each image's logits with its mirror's (and, "
                                   "when the run's recipe sets tta_translate, with shifted copies'); the accuracy "
                                   "without it comes from the same pass")
    evaluate_cmd.add_argument("--tta-translate", type=int, metavar="N",
                              help="with --tta: also average the image shifted N pixels up-left and down-right, "
                                   "each with its mirror (default: the run's own tta_translate)")
    evaluate_cmd.add_argument("--per-class", action="store_true",
                              help="also each class's images, accuracy and the class its images are most often "
                                   "taken for (without TTA, as a run's report.md)")

    lr_find_cmd = sub.add_parser("lr-find", parents=[common],
                                 help="LR range test: loss against a growing LR, with graphs")
    lr_find_cmd.add_argument("--mode", choices=(*MODES, "both"), default="both",
                             help="exponential or linear growth of the LR, or one sweep of each (default: both)")
    lr_find_cmd.add_argument("--start-lr", type=_number, help="first LR (default: 1e-5 exp, 1e-4 linear)")
    lr_find_cmd.add_argument("--end-lr", type=_number, help="last LR (default: 10 exp, 1 linear)")
    lr_find_cmd.add_argument("--sweep-epochs", type=_number, metavar="E",
                             help="length of each sweep in epochs of the recipe's batches (default: 1 exp, 6 linear)")
    lr_find_cmd.add_argument("--num-iter", type=int,
                             help="length of each sweep in iterations (instead of --sweep-epochs)")
    lr_find_cmd.add_argument("--smooth", type=_number, default=0.05,
                             help="weight of each new loss in the moving average (default: 0.05)")
    lr_find_cmd.add_argument("--diverge", type=_number, default=4.0,
                             help="stop once the smoothed loss stays above this many times its best (default: 4)")
    lr_find_cmd.add_argument("--patience", type=int,
                             help="for that many iterations in a row (default: 2%% of the sweep, at least 3)")
    lr_find_cmd.add_argument("--method", choices=METHODS, default="plateau",
                             help="how LRMAX is read off the curve: plateau (where the loss stops falling; the One "
                                  "Cycle rule), valley or steepest (default: plateau); LRMIN is always where the "
                                  "loss starts to fall")
    lr_find_cmd.add_argument("--out", metavar="DIR",
                             help="where the graphs and lr_find.json go (default: runs/lr-find-<timestamp>)")
    _add_recipe_flags(lr_find_cmd)
    _add_data_flags(lr_find_cmd)

    sweep_cmd = sub.add_parser("sweep", parents=[common],
                               help="train a grid of settings, or a list of changes to a recipe, over seeds; a "
                                    "table, statistics and a picture")
    sweep_cmd.add_argument("--vary", action="append", metavar="SETTING=V1,V2,...", default=[],
                           help="a recipe setting and its values (auto for lr_max or lr_min: the LR range test's "
                                "value, found in each run); several --vary make a grid")
    sweep_cmd.add_argument("--point", action="append", metavar="SETTING=V,...", default=[],
                           help="instead of --vary: one change to the recipe (one setting or several); the sweep "
                                "trains the recipe itself and each --point, and compares each with the recipe "
                                "(an ablation: each change alone)")
    sweep_cmd.add_argument("--seeds", type=int, default=1, metavar="N",
                           help="seeds --seed .. --seed+N-1 at every point, trained seed by seed (default: 1)")
    sweep_cmd.add_argument("--baseline", metavar="SETTING=V,...",
                           help="the point the others are compared with, paired by seed (default: the recipe's own "
                                "values, when they are in the grid)")
    sweep_cmd.add_argument("--out", metavar="SWEEP_DIR",
                           help="sweep folder (default: runs/sweep-<timestamp>); the same sweep again on it goes on "
                                "where it stopped")
    sweep_cmd.add_argument("--workers", type=int,
                           help="runs at once, each a train process; worker k uses GPU k (default: the number of "
                                "GPUs, 1 on a CPU)")
    sweep_cmd.add_argument("--print-commands", action="store_true",
                           help="make the sweep folder and print one 'cifar-onecycle train' command per remaining "
                                "run (for a job array), then --collect SWEEP_DIR")
    sweep_cmd.add_argument("--dry-run", action="store_true",
                           help="train nothing and write nothing: load the data, set each point's run up, time a "
                                "few steps of each kind (one point for a grid of LRs), and print each point's steps "
                                "and about how long its runs, and the sweep's, would take")
    sweep_cmd.add_argument("--collect", metavar="SWEEP_DIR",
                           help="write the table, statistics and pictures of SWEEP_DIR from its finished runs")
    sweep_cmd.add_argument("--report", action="store_true", help="write each run's pictures and report.md")
    sweep_cmd.add_argument("--no-checkpoint", action="store_true",
                           help="no checkpoint.pt in the runs (an interrupted run then starts again)")
    sweep_cmd.add_argument("--keep-checkpoint", action="store_true",
                           help="keep each finished run's checkpoint.pt (by default only its weights stay)")
    sweep_cmd.add_argument("--tensorboard", action="store_true", help="TensorBoard logs in each run folder")
    sweep_cmd.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    _add_recipe_flags(sweep_cmd)
    _add_data_flags(sweep_cmd)

    report_cmd = sub.add_parser("report", parents=[common], help="(re)write a run's pictures and report.md")
    report_cmd.add_argument("run_dir", metavar="RUN_DIR")
    _add_data_flags(report_cmd, "the folder the run was trained on, else ./data")
    _add_device_flags(report_cmd, "the mistakes shown are those the run's own accuracy counted")

    predict_cmd = sub.add_parser("predict", parents=[common], help="classify image files with a trained model")
    predict_cmd.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS")
    predict_cmd.add_argument("images", metavar="IMAGE_OR_FOLDER", nargs="+",
                             help="image files, or folders: the images in them and their sub-folders, sorted")
    predict_cmd.add_argument("--json", action="store_true", help="one JSON object per line")
    predict_cmd.add_argument("--gradcam", metavar="FILE.png",
                             help="also a picture of where the model looked: the first 32 images predicted, each "
                                  "as the model sees it (32x32) under its Grad-CAM at layer 3 for the predicted "
                                  "class, with the class's probability")
    _add_device_flags(predict_cmd)

    compare_cmd = sub.add_parser("compare", parents=[common],
                                 help="runs side by side: the settings that differ, final accuracies, each one's "
                                      "difference from the first paired by seed, and their curves")
    compare_cmd.add_argument("runs", metavar="RUN_DIR", nargs="+",
                             help="run folders (train --out), sets of seeds' (--seeds) or sweep points' "
                                  "(SWEEP_DIR/POINT); the first is the baseline")
    compare_cmd.add_argument("--picture", metavar="FILE.png",
                             help="also the runs' training loss and accuracy per epoch in one picture")
    compare_cmd.add_argument("--json", action="store_true", help="the numbers as one JSON object")

    summary_cmd = sub.add_parser("summary", parents=[common], help="print the model summary table (as in the seed)")
    summary_cmd.add_argument("--receptive-field", action="store_true",
                             help="also each convolution's and max-pool's jump and receptive field, in the order "
                                  "they run (a residual branch's on top of its layer: the deepest path)")
    summary_cmd.add_argument("--classes", type=int, default=10, metavar="N",
                             help="the network with N outputs, as trained on N classes (CIFAR-100: 100; a folder: "
                                  "its class folders) (default: 10, the seed's)")
    return parser


def recipe_from_args(args: argparse.Namespace, base: Recipe | None = None) -> Recipe:
    """``base`` (default: the seed's recipe), then --recipe FILE, then the flags given: each
    overrides the one before.

    ``--lr-max auto`` and ``--lr-min auto`` leave the recipe's values here; ``train`` replaces them
    with the range test's findings. ``--lr-min`` replaces a LRMIN the recipe derives from LRMAX
    (``lr_min_div``), and ``--epochs`` without ``--peak-epoch`` keeps the recipe's shape: the peak
    moves to the same fraction of the run.
    """
    base = load_recipe(args.recipe, base) if args.recipe else (base or Recipe())
    if hasattr(args, "lr_min") and hasattr(args, "lr_min_div"):
        raise UserError("--lr-min and --lr-min-div both set LRMIN; give one")
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
             if hasattr(args, f.name) and getattr(args, f.name) != "auto"}
    if "lr_min" in flags:
        flags["lr_min_div"] = 0.0
    if "epochs" in flags and "peak_epoch" not in flags:  # the recipe's shape over the new length
        epochs = flags.pop("epochs")
        return Recipe.from_dict({**base.to_dict(), **flags}, source="flags").with_epochs(epochs)
    return Recipe.from_dict({**base.to_dict(), **flags}, source="flags")


def cmd_train(args: argparse.Namespace) -> int:
    from .results import SPLIT_NAMES
    from .run_folder import SEEDS
    from .seeds import final_accuracies, train_seeds
    from .sweep_report import seeds_in_words
    from .training import train

    auto = [name for name in ("lr_max", "lr_min") if getattr(args, name, None) == "auto"]
    if args.seeds is not None and auto:
        # Every seed must train the same recipe, and a resumed set must not find another LR.
        raise UserError("--seeds trains one recipe several times: run lr-find once and pass its --lr-max and "
                        "--lr-min")
    if args.dry_run:
        if args.resume:
            raise UserError("--dry-run plans a new run; leave out --resume")
        planned = recipe_from_args(args)
        if args.seeds is not None:
            check_seed_range(planned.seed, args.seeds)
        return _print_dry_run(planned, args, auto)
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise UserError("--resume RUN_DIR writes into RUN_DIR; leave out --out")
        if auto or args.overwrite or args.seeds is not None:
            raise UserError("--resume continues a run as it was; --lr-max/--lr-min auto, --overwrite and --seeds "
                            "do not apply")
        out = Path(args.resume)
        # Recipe flags are allowed only where they restate the run's recipe; train() names any change.
        given = args.recipe or any(hasattr(args, f.name) for f in dataclasses.fields(Recipe))
        recipe = recipe_from_args(args, load_recipe(out / "recipe.toml")) if given else None
    else:
        recipe = recipe_from_args(args)
        out = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    options = dict(data_dir=args.data_dir, download=not args.no_download, out=out, overwrite=args.overwrite,
                   progress=not args.quiet, find_lr_max="lr_max" in auto, find_lr_min="lr_min" in auto,
                   resume=args.resume, tensorboard=args.tensorboard, report=not args.no_report,
                   checkpoints=not args.no_checkpoint, keep_checkpoint=args.keep_checkpoint)
    if args.seeds is not None or (args.resume and (out / SEEDS).is_file()):
        # train_seeds refuses a count below 1 (``args.seeds or 1`` would have run 1 for --seeds 0)
        over_seeds = train_seeds(recipe, 1 if args.seeds is None else args.seeds, **options).summary
        if _is_main():
            val = (f"validation accuracy {spread_in_words(over_seeds['final_val_acc'])}; "
                   if over_seeds.get("final_val_acc") else "")
            print(f"over {seeds_in_words(over_seeds['seeds'])}: final "
                  f"{val}test accuracy {spread_in_words(over_seeds['final_test_acc'])}, with flip TTA "
                  f"{spread_in_words(over_seeds['final_test_acc_tta'])}; run folder: {out} (summary.json, curves.png, "
                  f"seeds.md, seed<k>/)")
        return 0
    summary = train(recipe, **options).summary
    if not _is_main():
        return 0
    split = "val" if "best_val_acc" in summary else "test"
    print(f"{final_accuracies(summary)}; best {SPLIT_NAMES[split]} accuracy {summary[f'best_{split}_acc']:.2%} at "
          f"epoch {summary['best_epoch']}; {summary['total_seconds'] / 60:.1f} min on {summary['device']}, "
          f"{summary['precision']}; run folder: {out}")
    return 0


def _timed_steps(step_seconds: Sequence[float]) -> str:
    """The timed steps after the first, for a dry run's line: each of a few, else their median and range."""
    import statistics

    after = step_seconds[1:]
    if len(after) <= 4:
        return ", ".join(f"{t:.3g}" for t in after)
    return f"{statistics.median(after):.3g} (the median of {len(after)}, {min(after):.3g} to {max(after):.3g})"


def _print_dry_run(recipe: Recipe, args: argparse.Namespace, auto: list[str]) -> int:
    from .clock import format_seconds
    from .run_plan import dry_run

    plan = dry_run(recipe, data_dir=args.data_dir, download=not args.no_download, progress=not args.quiet,
                   find_lr_max="lr_max" in auto, find_lr_min="lr_min" in auto)
    if not _is_main():
        return 0
    r = plan.recipe
    held = f", {plan.val_images:,} held out for validation" if plan.val_images else ""
    knots = ", ".join(f"step {step + 1}: {lr:g}" for step, lr in plan.cycle.lr_knots)
    found = (f"; {' and '.join(auto)} auto: the run's LR range test finds {'them' if len(auto) > 1 else 'it'} first, "
             f"in at most {plan.range_test_steps:,} steps (the knots show the recipe's values)" if auto else "")
    tflop = plan.flops_per_image * r.batch_size * plan.total_steps / 1e12
    runs = args.seeds or 1
    print(f"dry run: nothing trained or written\n"
          f"device {plan.device}, precision {plan.precision}\n"
          f"data: {plan.train_images:,} training images{held}, {plan.test_images:,} test images, "
          f"{len(r.class_names)} classes\n"
          f"{r.epochs} epochs of {plan.steps_per_epoch:,} steps of {r.batch_size}: {plan.total_steps:,} steps, "
          f"{f'{tflop:,.0f}' if tflop >= 10 else f'{tflop:.2g}'} TFLOP of training\n"
          f"One Cycle LR knots (the LR of the step; straight lines between): {knots}{found}\n"
          f"timed: the first step {plan.step_seconds[0]:.3g} s (allocation"
          f"{', compilation' if r.compile else ''}), then {_timed_steps(plan.step_seconds)} s a step; an evaluation "
          f"batch of {plan.eval_batch_images} images {plan.eval_batch_seconds:.3g} s\n"
          f"about {format_seconds(plan.estimated_seconds)} for the run ("
          + (f"{format_seconds(plan.range_test_seconds)} of range test, " if auto else "")
          + f"{format_seconds(plan.training_seconds)} of steps, {format_seconds(plan.evaluation_seconds)} of "
          f"evaluations)"
          + (f", {format_seconds(runs * plan.estimated_seconds)} for the {runs} seeds" if runs > 1 else "")
          + "; data loading, the final evaluations and the report come on top")
    return 0


def spread_in_words(values: dict[str, Any]) -> str:
    """A set of seeds' accuracy (``results.spread``) as its last line gives it."""
    if values["std"] is None:  # one seed: no spread to give
        return f"{values['mean']:.2%} (one run)"
    return (f"mean {values['mean']:.2%} (std {100 * values['std']:.2f} points, min {values['min']:.2%}, "
            f"max {values['max']:.2%})")


def _load_data(args: argparse.Namespace, recipe: Recipe, split: str = "both",
               recorded: tuple[Any, Path] | None = None) -> LabelledImages:
    """The recipe's data set from ``--data-dir``, else from the folder a run's file recorded
    (``recorded``: the value and the file; read only, never created or downloaded into), else
    ./data."""
    from .data import recorded_data_dir
    from .datasets import load_dataset

    if args.data_dir is None and recorded is not None and recorded[0] is not None:
        if not isinstance(recorded[0], str):
            raise UserError(f"{recorded[1]}: data_dir {recorded[0]!r} is not a folder's name; give --data-dir")
        return load_dataset(recipe, recorded_data_dir(recorded[0], recorded[1]), download=False, split=split)
    return load_dataset(recipe, args.data_dir or "data", download=not args.no_download, split=split, progress=True)


def _placed(args: argparse.Namespace, model: torch.nn.Module,
            recipe: Recipe) -> tuple[torch.nn.Module, torch.device, str]:
    """A saved model on ``--device`` in its recipe's memory format, and the arithmetic to run it in
    (``--precision``, else the run's own): as the run evaluated it. Returns (model, device, precision)."""
    from .device import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision or recipe.precision, device)
    # torch's stubs leave out Module.to's memory_format, which it takes at run time
    return model.to(device, memory_format=recipe.memory_format), device, precision  # type: ignore[call-overload]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_weights
    from .datasets import check_classes
    from .evaluation import evaluate_recipe
    from .report import class_accuracies, class_rows, confusion_matrix
    from .results import SPLIT_NAMES
    from .run_folder import SUMMARY, RunFolder
    from .run_setup import split_images

    RunFolder(args.weights).check_usable()
    saved, recipe = load_weights(args.weights)
    val = args.split == "val"
    if val and args.dataset:
        raise UserError("--split val scores the images the run held out of its own training set; leave out "
                        "--dataset")
    if val and not recipe.holdout:
        raise UserError(f"{args.weights}: its run held out no training images (holdout 0); --split val needs a "
                        f"run trained with --holdout N")
    if args.tta_translate is not None:
        if not args.tta:
            raise UserError("--tta-translate goes with --tta (it adds shifted copies to the mirror); add --tta")
        recipe = recipe.replace(tta_translate=args.tta_translate)
    model, device, precision = _placed(args, saved, recipe)
    source = recipe.replace(dataset=args.dataset) if args.dataset else recipe
    run = RunFolder(args.weights)  # a run folder's own data, unless another source or folder is given
    recorded = (run.read_summary().get("data_dir"), run.path / SUMMARY) if (
        not args.dataset and run.path.is_dir() and run.has(SUMMARY)) else None
    data = _load_data(args, source, split="both" if val else "test", recorded=recorded)
    check_classes(recipe, data, f"--dataset {source.dataset} in {args.data_dir or (recorded or ['data'])[0]}")
    images, labels = split_images(recipe, data, args.split)  # with val, the images the run validated on
    # With TTA the same pass scores the images without it too: its unshifted forward is theirs.
    scores = evaluate_recipe(model, images.to(device), labels.to(device), recipe, precision, tta=args.tta,
                             keep_probabilities=args.per_class)
    loss, acc = scores.loss_and_acc(args.tta)
    n = len(images)
    cm = None if scores.probabilities is None else confusion_matrix(
        labels.cpu(), scores.probabilities.argmax(1), recipe.num_classes)
    if args.json:
        print(json.dumps({"split": args.split, "accuracy": acc, "loss": loss, "images": n, "tta": args.tta,
                          "tta_translate": recipe.tta_translate if args.tta else 0}
                         | ({"accuracy_without_tta": scores.acc, "loss_without_tta": scores.loss} if args.tta else {})
                         | ({"per_class_accuracy": dict(zip(recipe.class_names, class_accuracies(cm), strict=True))}
                            if cm is not None else {})))
        return 0
    print(f"{SPLIT_NAMES[args.split]} accuracy {acc:.2%}  loss {loss:.4f}  on {n:,} images "
          f"({device.type}, {precision}"
          + (f", TTA: mirror and {recipe.tta_translate}-pixel shifts" if args.tta and recipe.tta_translate
             else ", flip TTA" if args.tta else "")
          + (f"; without it {scores.acc:.2%}, loss {scores.loss:.4f}" if args.tta else "") + ")")
    if cm is not None:
        print(("by class, without TTA:\n" if args.tta else "")
              + aligned(class_rows(cm, [one_line(name) for name in recipe.class_names], SPLIT_NAMES[args.split])))
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .lr_finder import DEFAULT_RANGES, MAX_SWEEP_EPOCHS, MODES, check_sweep, lr_range_test, write_lr_find
    from .run_folder import RunFolder

    recipe = recipe_from_args(args)
    modes = MODES if args.mode == "both" else (args.mode,)
    if args.num_iter is not None and args.sweep_epochs is not None:
        raise UserError("--num-iter and --sweep-epochs both set a sweep's length; give one")
    if args.sweep_epochs is not None and not 0 < args.sweep_epochs <= MAX_SWEEP_EPOCHS:  # NaN fails both
        raise UserError(f"--sweep-epochs must lie in (0, {MAX_SWEEP_EPOCHS}], got {args.sweep_epochs:g}")
    for mode in modes:  # refuse a bad range before loading anything
        lo, hi = DEFAULT_RANGES[mode]
        check_sweep(mode, lo if args.start_lr is None else args.start_lr, hi if args.end_lr is None else args.end_lr,
                    10 if args.num_iter is None else args.num_iter, args.smooth, args.diverge, args.patience)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("lr-find-%Y%m%d-%H%M%S")
    RunFolder(out).check_range_test_replaceable()
    data = _load_data(args, recipe)
    sweep = {k: getattr(args, k) for k in ("start_lr", "end_lr", "patience") if getattr(args, k) is not None}
    with contextlib.ExitStack() as held:
        if _is_main():
            writable_folder(out)  # after the data's checks (a bad input leaves no folder), before the sweep
            held.enter_context(FolderLock(out, "out"))  # a run's folder, say, while that run writes there
            RunFolder(out).check_range_test_replaceable()  # again, held: a run may have ended there meanwhile
        results = lr_range_test(recipe, data, modes, epochs=args.sweep_epochs, num_iter=args.num_iter,
                                smooth=args.smooth, diverge=args.diverge, method=args.method, **sweep)
        if not _is_main():
            return 0
        for path in write_lr_find(results, out):
            print(f"wrote {path}")
    for mode, r in results.items():
        def shown(lr: float | None) -> str:
            return f"{lr:.4g}" if lr is not None else "none"
        print(f"{mode:>6}: LRMAX {shown(r.suggested_lr_max)} ({r.lr_max_rule}), LRMIN {shown(r.suggested_lr_min)} "
              f"({r.lr_min_rule}) over {len(r.lrs)} iterations"
              + (f"; stopped early: {r.stopped}" if r.stopped else "") + (f"; {r.note}" if r.note else ""))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .checkpoint import load_weights
    from .files import FolderLock
    from .report import write_report
    from .run_folder import RunFolder

    run = RunFolder(args.run_dir)
    with FolderLock(run.path, None):  # a run training there again (an overwrite) would mix its files with these
        run.check_usable()
        saved, recipe = load_weights(run.path)
        summary, history = run.read_summary(), run.read_metrics()
        data = _load_data(args, recipe, recorded=(summary.get("data_dir"), run.path / "summary.json"))
        model, device, precision = _placed(args, saved, recipe)
        run.write_summary(write_report(run.path, model, recipe, history, summary, data.test_images.to(device),
                                       data.test_labels, data.train_images[:20], summary["steps_per_epoch"],
                                       precision))
    print(f"wrote {run.path / 'report.md'} and its pictures")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .checkpoint import load_weights
    from .device import resolve_device
    from .predict import GRADCAM_IMAGES, Prediction, gradcam_figure, image_paths, predict_files
    from .report import save_png
    from .run_folder import RunFolder

    picture = _picture(args.gradcam, "gradcam")
    RunFolder(args.weights).check_usable()
    model, recipe = load_weights(args.weights)
    model = model.to(resolve_device(args.device))
    failed = 0
    drawn: list[Prediction] = []
    for p in predict_files(model, image_paths(args.images), recipe.class_names, recipe.normalization):
        if picture is not None and p.top and len(drawn) < GRADCAM_IMAGES:
            drawn.append(p)
        if p.error or p.top is None:
            failed += 1
            print(f"{PROG}: error: {one_line(str(p.error))}", file=sys.stderr)
            if args.json:
                print(json.dumps({"path": p.path, "error": p.error}))
        elif args.json:  # allow_nan=False: a line that is not JSON fails here, not in the reader
            print(json.dumps({"path": p.path, "class": p.top[0][0],
                              "top3": [{"class": c, "probability": v} for c, v in p.top]}, allow_nan=False))
        else:
            print(one_line(f"{p.path}: {p.top[0][0]}  (" + ", ".join(f"{c} {v:.1%}" for c, v in p.top) + ")"))
    figure = gradcam_figure(model, drawn, recipe.normalization) if picture is not None else None
    if picture is not None and figure is not None:  # no figure when no image was predicted
        save_png(figure, picture)
        if not args.json:
            print(one_line(f"Grad-CAM of {len(drawn)} image{'s' if len(drawn) > 1 else ''}: {picture}"))
    return 2 if failed else 0


def _picture(name: str | None, setting: str) -> Path | None:
    """The PNG file a command is to draw, checked before its work: a picture that cannot be saved
    would waste it."""
    if name is None:
        return None
    picture = Path(name)
    if picture.suffix.lower() != ".png" or picture.is_dir() or not picture.parent.is_dir():
        raise UserError(f"{_flag(setting)} {name}: give a .png file's name in a folder that exists")
    writable_folder(picture.parent, setting, create=False)
    return picture


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .report import save_png
    from .results import SPLIT_NAMES, split_of

    picture = _picture(args.picture, "picture")
    comparison = compare(args.runs)
    if picture is not None:
        save_png(comparison.figure(), picture)
    if args.json:  # allow_nan=False: what is not JSON fails here, not in the reader
        print(json.dumps(comparison.stats, allow_nan=False))
        return 0
    if comparison.folder is not None:
        print(one_line(f"runs in {comparison.folder}{os.sep}"))
    print(aligned([[one_line(cell) for cell in row] for row in comparison.table()]))
    split = split_of(comparison.stats["selection"])
    print(f"\nMeans over the runs that finished, in %, their standard error in brackets; \"vs baseline\": the "
          f"difference in {SPLIT_NAMES[split]} accuracy from the first run, paired by seed (-: no seed finished in "
          f"both).")
    if split == "test":
        print("These are test accuracies: choosing a setting on them tunes it to the test set; runs trained with "
              "--holdout N are compared on the images they held out.")
    if picture is not None:
        print(one_line(f"curves: {picture}"))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .run_plan import dry_run_sweep
    from .sweep import collect, sweep
    from .sweep_plan import parse_point, parse_vary

    if args.collect:
        if args.vary or args.point or args.print_commands or args.dry_run:
            raise UserError("--collect reads a sweep folder as it is; leave out --vary, --point, --print-commands "
                            "and --dry-run")
        result = collect(args.collect)
    else:
        if not (args.vary or args.point):
            raise UserError("sweep: give at least one --vary SETTING=VALUE,VALUE,... or --point SETTING=VALUE,... "
                            "(or --collect SWEEP_DIR)")
        vary = parse_vary(args.vary)
        points = [parse_point(spec, "point") for spec in args.point] or None
        given = {f.name for f in dataclasses.fields(Recipe) if hasattr(args, f.name)}
        both = sorted(given & set(vary))  # a --point changes the recipe the flags make: no conflict
        if both:
            raise UserError(f"{_flag(both[0])} is both fixed and varied; give it in one place")
        workers = args.workers
        if workers is None:
            import torch

            workers = max(1, torch.cuda.device_count()) if getattr(args, "device", "auto") != "cpu" else 1
        if args.dry_run:
            if args.print_commands:
                raise UserError("--dry-run plans the sweep's runs here; leave out --print-commands (the plan's "
                                "time for a run of each point is what a job of the array takes)")
            return _print_sweep_dry_run(dry_run_sweep(
                recipe_from_args(args), vary, args.seeds, out=args.out, points=points,
                baseline=parse_point(args.baseline) if args.baseline else None, data_dir=args.data_dir,
                download=not args.no_download, progress=not args.quiet, workers=workers))
        out = Path(args.out) if args.out else Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S")
        result = sweep(recipe_from_args(args), vary, args.seeds, out=out,
                       baseline=parse_point(args.baseline) if args.baseline else None, data_dir=args.data_dir,
                       download=not args.no_download, progress=not args.quiet, workers=workers,
                       report=args.report, checkpoints=not args.no_checkpoint,
                       keep_checkpoint=args.keep_checkpoint, tensorboard=args.tensorboard,
                       print_commands=args.print_commands, points=points)
        if args.print_commands:
            for command in result.commands:
                print(command)
            return 0
    print(sweep_table(result.stats))
    left = f"; {result.remaining} runs not finished" if result.remaining else ""
    print(f"sweep folder: {result.path} (sweep.csv, sweep.json, sweep.png, sweep_curves.png, sweep.md){left}")
    return 0


def _print_sweep_dry_run(planned: SweepDryRun) -> int:
    from .clock import format_seconds
    from .sweep_report import seeds_in_words

    plan = planned.plan
    first = next((p.run for p in planned.points if p.run), None)
    seeds = seeds_in_words(plan.seed_range)
    ended = f", {planned.ended} ended in the sweep's folder" if planned.ended else ""
    print("dry run: nothing trained or written")
    if first:
        print(f"device {first.device}, precision {first.precision}")
    print(f"{len(plan.points)} points x {seeds}: {planned.runs} runs to do{ended}")
    rows = [("point", "runs", "steps", "s a step", "a run", "its runs")]
    for p in planned.points:
        if p.run is None:
            why = f"evaluated again from {p.evaluated_as.name}'s weights" if p.evaluated_as and p.runs else "ended"
            rows.append((p.point.name, str(p.runs), "-", "-", why, ""))
            continue
        r = p.run
        steps = f"{r.total_steps:,}" + (f" + {r.range_test_steps:,} range test" if r.range_test_steps else "")
        rows.append((p.point.name, str(p.runs), steps, f"{r.seconds_a_step:.3g}", format_seconds(r.estimated_seconds),
                     format_seconds(p.estimated_seconds)))
    print(aligned(rows))
    for p in planned.points:
        if p.run is not None and p.timed_as is None:
            r = p.run
            others = [q.point.name for q in planned.points if q.timed_as == p.point]
            print(f"timed {p.point.name}: the first step {r.step_seconds[0]:.3g} s, "
                  f"then {_timed_steps(r.step_seconds)} s; an evaluation batch of {r.eval_batch_images} images "
                  f"{r.eval_batch_seconds:.3g} s"
                  + (f"; the same work a step: {', '.join(others)}" if others else ""))
    at_once = "one at a time" if planned.at_once == 1 else f"{planned.at_once} at a time, a GPU each"
    print(f"about {format_seconds(planned.estimated_seconds)} for the {planned.runs} runs, {at_once} (range tests, "
          f"steps and per-epoch evaluations); data loading, the final evaluations and the reports come on top")
    return 0


def sweep_table(stats: dict[str, Any]) -> str:
    """sweep.json's points as a short table (``sweep_report.sweep_table_rows``)."""
    from .sweep_report import sweep_table_rows

    return aligned(sweep_table_rows(stats, short=True))


def aligned(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` of text as columns two spaces apart, each as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def cmd_summary(args: argparse.Namespace) -> int:
    from .model import ResNet9
    from .summary import summarize

    if not 2 <= args.classes <= MAX_CLASSES:
        raise UserError(f"--classes {args.classes}: a network for 2 to {MAX_CLASSES:,} classes")
    summary = summarize(ResNet9(num_classes=args.classes))
    print(summary.table())
    if args.receptive_field:
        print("\n" + summary.receptive_field_table())
    return 0


def _is_main() -> bool:
    """Rank 0 under torchrun (or a single process): the one that prints results."""
    return launch_rank() == 0


def _prog() -> str:
    return PROG if _is_main() else f"{PROG} (rank {launch_rank()})"


def _flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def with_flags(error: UserError) -> str:
    """The error's message with each setting it marks written as its flag (``--batch-size 600``)."""
    return error.render(_flag)


def main(argv: Sequence[str] | None = None) -> int:
    # A file name that is not UTF-8 reaches Python as surrogates; a UTF-8 locale's strict standard
    # output would stop the command with a traceback at its first print. Written as escapes
    # instead, as Python writes them to standard error.
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    finally:
        shutdown()


def _run(args: argparse.Namespace) -> int:
    try:
        commands = {"train": cmd_train, "evaluate": cmd_evaluate, "lr-find": cmd_lr_find, "report": cmd_report,
                    "predict": cmd_predict, "summary": cmd_summary, "sweep": cmd_sweep, "compare": cmd_compare}
        return commands[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        tqdm.write(f"{_prog()}: error: {one_line(with_flags(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\n{_prog()}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file system's refusal of a path given (a name too long, a folder that
        # cannot be searched) where no check foresaw it: the path and the system's reason, on one line
        if e.filename is None or args.debug:
            raise
        hint = {errno.ENAMETOOLONG: "; give a shorter name", errno.EACCES: "; check its permissions",
                errno.EPERM: "; check its permissions"}.get(e.errno or 0, "")
        print(f"{_prog()}: error: {one_line(str(e.filename))}: {e.strerror or e}{hint}", file=sys.stderr)
        return 2
    except Exception as e:  # running out of memory is the one runtime failure a flag can fix
        if not _out_of_memory(e) or args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "device memory" if type(e).__name__ == "OutOfMemoryError" else "memory"
        print(f"{_prog()}: error: out of {where} ({first[:200]}); pass a smaller --batch-size or --eval-batch-size",
              file=sys.stderr)
        return 2


def _out_of_memory(e: Exception) -> bool:
    """A GPU's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    return (type(e).__name__ == "OutOfMemoryError" or isinstance(e, MemoryError)
            or isinstance(e, RuntimeError) and ("DefaultCPUAllocator" in str(e) or "not enough memory" in str(e)))
