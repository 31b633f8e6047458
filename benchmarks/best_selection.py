"""The selection rules for `best` (benchmarks/results/README.md, "Selection plan for `best`") as code,
written before any run, so that no stage's choice is made by eye.

A candidate is the points of stage 1's list sweep that begin with the same setting (``bn_scale_frozen=true``
and ``bn_scale_frozen=true,bn_bias_lr_mult=16`` are one candidate). Each is judged on the sweep's
selection accuracy (``final_val_acc``), or on ``final_val_acc_tta`` where it changes only the
evaluation (``tta_translate``), by its difference from the baseline paired by seed (sweep.json).

- Stage 1 to stage 2: a candidate helped if one of its points is above the recipe (``dawnbench``);
  the point with the largest difference goes on. Two points that go on may change one setting
  (``ema_decay=0.95,ema_lookahead=true,bn_momentum=0.6`` and ``bn_momentum=0.3``): then the one with
  the larger difference goes on and the other candidate is set aside, so that each candidate's
  settings are its own to leave out. Stage 2's recipe is ``dawnbench`` with every candidate that
  went on, and its list sweep leaves each out in turn (its settings back to ``dawnbench``'s
  values), seeds 0 to 3.
- Stage 2 to ``best``: a candidate stays if leaving it out lowers the accuracy (a difference below 0).
- The final: ``dawnbench`` itself against ``best`` (one point: every candidate kept) on the full
  training set and the test set, seeds 0 to 7; sweep.json's paired difference, without and with
  TTA, is the result. The ``seed`` recipe, as the changes it makes to ``dawnbench``, is a point
  too: the README's recipes table, every recipe over the same 8 seeds, comes from one sweep.

    python benchmarks/best_selection.py stage2 STAGE1_SWEEP_DIR --out DIR  # DIR/stage2.toml, DIR/stage2.txt
    python benchmarks/best_selection.py best STAGE2_SWEEP_DIR --out best.toml  # and the final's sweep

A sweep with runs left to train is refused (a choice on part of the seeds is not the plan's); a
point whose runs all failed (diverged) did not help.
"""
from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_onecycle.recipe import Recipe, load_recipe
from cifar_onecycle.sweep import STATS, SweepFolder
from cifar_onecycle.sweep_plan import EVALUATION_ONLY, Point, format_point

STAGE2_SEEDS, FINAL_SEEDS = 4, 8


class SelectionError(Exception):
    """A sweep the rules cannot judge."""


@dataclass
class Judged:
    """One point of a sweep, judged: its candidate (the first setting it changes), the accuracy it is
    judged on, and its mean difference from the baseline paired by seed (None: nothing to pair)."""

    point: Point
    candidate: str
    accuracy: str
    difference: float | None
    sem: float | None
    n: int


def judge(folder: Path) -> tuple[Recipe, list[Judged]]:
    """The sweep's base recipe and every point but the baseline, judged; the sweep must be a list."""
    plan, base = SweepFolder(folder).read()
    if plan.listed is None:
        raise SelectionError(f"{folder}: a grid sweep; the stages are list sweeps (--point)")
    stats = json.loads((folder / STATS).read_text())
    if stats["remaining_runs"]:
        raise SelectionError(f"{folder}: {stats['remaining_runs']} runs left to train; the rules judge a whole sweep")
    by_name = {p["point"]: p for p in stats["points"]}
    baseline = by_name.get(stats["baseline"], {})
    if not baseline.get(stats["selection"], {}).get("n"):
        raise SelectionError(f"{folder}: no finished run of the baseline ({stats['baseline']}) to compare with")
    judged = []
    for point in plan.points[1:]:
        candidate = point.values[0][0]
        accuracy = stats["selection"] + ("_tta" if candidate in EVALUATION_ONLY else "")
        paired = (by_name.get(point.name, {}).get(accuracy) or {}).get("paired_difference") or {}
        judged.append(Judged(point, candidate, accuracy, paired.get("mean"), paired.get("sem"), paired.get("n", 0)))
    return base, judged


def stage2(stage1: Path) -> tuple[Recipe, list[dict[str, Any]], list[Judged], list[tuple[Judged, Judged]]]:
    """Stage 2 from stage 1: the recipe with every candidate that helped (at its best point), the
    points that leave each out, the stage-1 points chosen, and those set aside (each with the
    chosen point that changes one of its settings)."""
    base, judged = judge(stage1)
    best: dict[str, Judged] = {}
    for j in judged:
        if j.difference is not None and j.difference > 0 and (
                j.candidate not in best or j.difference > (best[j.candidate].difference or 0.0)):
            best[j.candidate] = j
    if not best:
        raise SelectionError(f"{stage1}: no candidate is above the recipe; there is no stage 2")
    taken: dict[str, Judged] = {}  # setting: the chosen point that changes it
    set_aside: list[tuple[Judged, Judged]] = []
    for j in sorted(best.values(), key=lambda j: -(j.difference or 0.0)):  # stable: plan order among equals
        other = next((taken[k] for k, _ in j.point.values if k in taken), None)
        if other is None:
            taken.update({k: j for k, _ in j.point.values})
        else:
            set_aside.append((j, other))
    chosen = [j for j in best.values() if j not in (s for s, _ in set_aside)]
    changes: dict[str, Any] = {}
    for j in chosen:
        changes.update(j.point.values)
    recipe = Point(tuple(changes.items())).recipe(base, base.seed)
    leave_out = [{k: getattr(base, k) for k, _ in j.point.values} for j in chosen]
    return recipe, leave_out, chosen, set_aside


def stage2_args(recipe_file: Path, leave_out: list[dict[str, Any]]) -> list[str]:
    """Stage 2's ``cifar-onecycle sweep`` flags: its recipe and the points that leave each candidate out."""
    return ["--recipe", str(recipe_file), "--seeds", str(STAGE2_SEEDS),
            *(w for values in leave_out for w in ("--point", format_point(values)))]


def best_recipe(stage2_folder: Path) -> tuple[Recipe, list[Judged], list[Judged]]:
    """``best`` from stage 2: its recipe less every candidate whose leaving out did not lower the
    accuracy; the candidates kept and those dropped (judged on their leave-out points)."""
    combined, judged = judge(stage2_folder)
    kept = [j for j in judged if j.difference is not None and j.difference < 0]
    dropped = [j for j in judged if j not in kept]
    reverted: dict[str, Any] = {}
    for j in dropped:
        reverted.update(j.point.values)
    recipe = Point(tuple(reverted.items())).recipe(combined, combined.seed) if reverted else combined
    return recipe, kept, dropped


def as_changes(recipe: Recipe, base: Recipe) -> dict[str, Any]:
    """``recipe`` as the settings it changes in ``base`` (a given LRMIN stands for its divisor)."""
    changes = {k: v for k, v in recipe.to_dict().items() if v != getattr(base, k) and k != "seed"}
    if "lr_min" in changes:
        changes.pop("lr_min_div", None)
    if Point(tuple(changes.items())).recipe(base, recipe.seed) != recipe:
        raise SelectionError(f"the recipe is not a change of its base: {format_point(changes)}")
    return changes


def final_args(stage2_folder: Path) -> list[str]:
    """The final's ``cifar-onecycle sweep`` flags: ``dawnbench`` and, as its points, ``best``'s
    changes to it (the candidates stage 2 kept) and ``seed``'s; no holdout, ``FINAL_SEEDS`` seeds."""
    best, kept, _ = best_recipe(stage2_folder)
    if not kept:
        raise SelectionError(f"{stage2_folder}: stage 2 kept no candidate, so best is dawnbench; no final to run")
    changes = {k: getattr(best, k) for j in kept for k, _ in j.point.values}
    seed = as_changes(load_recipe("seed"), load_recipe("dawnbench"))
    return ["--recipe", "dawnbench", "--holdout", "0", "--seeds", str(FINAL_SEEDS), "--point", format_point(changes),
            "--point", format_point(seed)]


def describe(j: Judged) -> str:
    difference = "no finished pair" if j.difference is None else (
        f"{100 * j.difference:+.2f} points" + (f" (sem {100 * j.sem:.2f})" if j.sem is not None else ""))
    return f"{j.point.name}: {difference} on {j.accuracy}, {j.n} seeds"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("stage2", "best"))
    ap.add_argument("sweep", type=Path, help="the sweep folder of the stage before")
    ap.add_argument("--out", type=Path, required=True, help="stage2: a folder; best: the recipe file to write")
    args = ap.parse_args()
    try:
        if args.step == "stage2":
            recipe, leave_out, chosen, set_aside = stage2(args.sweep)
            args.out.mkdir(parents=True, exist_ok=True)
            toml = args.out / "stage2.toml"
            toml.write_text(f"# stage 2: the recipe of {args.sweep} with every stage-1 candidate that helped\n"
                            + "".join(f"# {describe(j)}\n" for j in chosen)
                            + "".join(f"# set aside: {describe(j)}; {other.point.name} changes the same setting "
                                      f"by more\n" for j, other in set_aside) + recipe.to_toml())
            line = shlex.join(["stage2", *stage2_args(toml, leave_out)])
            (args.out / "stage2.txt").write_text(f"# from {args.sweep}\n{line}\n")
            print(f"{toml}\n{args.out / 'stage2.txt'}: {line}")
        else:
            recipe, kept, dropped = best_recipe(args.sweep)
            args.out.write_text(f"# the recipe of {args.sweep} less what did not help; leaving each kept one out cost\n"
                                + "".join(f"# {describe(j)}\n" for j in kept)
                                + "# dropped (leaving it out cost nothing):\n"
                                + "".join(f"# {describe(j)}\n" for j in dropped) + recipe.to_toml())
            final = shlex.join(final_args(args.sweep))
            print(f"{args.out}\nbest's final (dawnbench against it): cifar-onecycle sweep {final}")
    except SelectionError as e:
        raise SystemExit(f"best_selection: {e}") from None


if __name__ == "__main__":
    main()
