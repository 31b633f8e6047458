"""cifar-onecycle sweep: the grid and its folders, the table and statistics, resuming, refusing another
sweep on the same folder, diverged runs, commands for a scheduler and --collect."""
import csv
import importlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cifar_onecycle import Interrupted, Recipe, collect, evaluation, load_recipe, sweep, train
from cifar_onecycle.cli import main
from cifar_onecycle.recipe import DATA_FIELDS
from cifar_onecycle.results import EpochMetrics
from cifar_onecycle.run_folder import RunFolder
from cifar_onecycle.run_setup import RunSetup
from cifar_onecycle.sweep import ACCURACIES, SweepFolder, worker_environment
from cifar_onecycle.sweep_plan import KIND_WORDS, KINDS, UNVARIED, Plan, parse_point, parse_vary
from conftest import ROOT, recipe_flags
from test_train import TINY

# The recipe's own lr_max 0.02 is a point of the grid below: the default baseline. Three steps of 10
# images an epoch (30 of the 80 the holdout leaves).
SMALL = Recipe(**{**TINY, "train_subset": 30}, holdout=20)
# Its flags but --lr-max, which these sweeps vary (the seed's lr_max is not written out).
FIXED = recipe_flags(SMALL.replace(lr_max=Recipe().lr_max))


def test_the_grid_runs_seed_by_seed_in_folders_named_for_their_values():
    plan = Plan(parse_vary(["lr_max=0.01,0.02", "flip=true,false"]), first_seed=3, seeds=2)
    assert [(seed, point.name) for seed, point in plan.runs()] == [
        (3, "lr_max=0.01,flip=true"), (3, "lr_max=0.01,flip=false"), (3, "lr_max=0.02,flip=true"),
        (3, "lr_max=0.02,flip=false"),
        (4, "lr_max=0.01,flip=true"), (4, "lr_max=0.01,flip=false"), (4, "lr_max=0.02,flip=true"),
        (4, "lr_max=0.02,flip=false")]
    point = plan.points[1]
    recipe = point.recipe(SMALL, 4)
    assert (recipe.lr_max, recipe.flip, recipe.seed, recipe.holdout) == (0.01, False, 4, 20)
    assert point.flags() == ["--lr-max", "0.01", "--no-flip"]
    folder = SweepFolder("sw")
    assert str(folder.run(point, 4).path) == os.path.join("sw", "lr_max=0.01,flip=false", "seed4")


def test_a_list_trains_the_recipe_then_each_change_alone_seed_by_seed():
    changes = [parse_point("flip=false", "point"), parse_point("bn_momentum=0.3,lr_max=0.04", "point")]
    plan = Plan({}, first_seed=3, seeds=2, listed=changes)
    plan.check(SMALL)
    assert [(seed, point.name) for seed, point in plan.runs()] == [
        (3, "recipe"), (3, "flip=false"), (3, "bn_momentum=0.3,lr_max=0.04"),
        (4, "recipe"), (4, "flip=false"), (4, "bn_momentum=0.3,lr_max=0.04")]
    assert plan.baseline_point == plan.points[0] and plan.settings == ["flip", "bn_momentum", "lr_max"]
    assert plan.points[0].recipe(SMALL, 4) == SMALL.replace(seed=4) and plan.points[0].flags() == []
    recipe = plan.points[2].recipe(SMALL, 3)
    assert (recipe.bn_momentum, recipe.lr_max, recipe.flip, recipe.seed) == (0.3, 0.04, True, 3)
    assert plan.points[2].flags() == ["--bn-momentum", "0.3", "--lr-max", "0.04"]
    assert Plan.from_json(plan.to_json(), "plan") == plan
    assert str(SweepFolder("sw").run(plan.points[0], 3).path) == os.path.join("sw", "recipe", "seed3")


def test_a_point_that_changes_only_the_evaluation_trains_as_the_first_that_trains_the_same():
    grid = Plan(parse_vary(["flip=true,false", "tta_translate=0,1,2"]), first_seed=0, seeds=2)
    twins = {p.name: t.name for p, t in grid.trained_as(SMALL).items()}
    assert twins == {"flip=true,tta_translate=1": "flip=true,tta_translate=0",
                     "flip=true,tta_translate=2": "flip=true,tta_translate=0",
                     "flip=false,tta_translate=1": "flip=false,tta_translate=0",
                     "flip=false,tta_translate=2": "flip=false,tta_translate=0"}
    listed = Plan({}, 0, 1, listed=[parse_point(s, "point") for s in (
        "tta_translate=1", "lr_max=0.04", "lr_max=0.04,tta_translate=2", "lr_max=auto,tta_translate=1")])
    assert {p.name: t.name for p, t in listed.trained_as(SMALL).items()} == {
        "tta_translate=1": "recipe", "lr_max=0.04,tta_translate=2": "lr_max=0.04"}  # auto: found in each run
    # With TTA after every epoch, tta_translate changes metrics.csv: each point trains.
    assert listed.trained_as(SMALL.replace(tta=True)) == {}


def test_every_setting_a_sweep_may_vary_has_a_kind_it_parses():
    assert {KINDS[k] for k in KINDS if k not in UNVARIED} <= set(KIND_WORDS)


def test_a_varied_setting_acts_as_its_flag_would():
    base = Recipe(lr_min_div=100.0, lr_max=0.4)
    point = Plan(parse_vary(["lr_min=0.001", "epochs=12"]), 0, 1).points[0]
    recipe = point.recipe(base, 0)
    assert recipe.lr_min == 0.001 and recipe.lr_min_div == 0.0  # a given LRMIN replaces the derived one
    assert recipe.epochs == 12 and recipe.peak_epoch == 2.5  # the recipe's shape over 12 epochs


@pytest.mark.parametrize("specs, message", [
    (["lr_maxx=0.1"], "unknown setting 'lr_maxx'"),
    (["lr_max=0.1,fast"], "lr_max=fast: not a float or auto"),
    (["flip=yes"], "flip=yes: not a bool"),
    (["batch_size=auto"], "batch_size=auto: not an int"),
    (["seed=1,2"], "seed is not varied: every point trains the same seeds"),
    (["classes=a,b"], "--vary: classes is not varied: a sweep reads its data once"),  # a tuple: refused, not parsed
    (["lr_max=0.1,0.10"], "needs distinct values"),
    (["lr_max=-1"], "lr_max must be > 0"),
    (["lr_min=0.1", "lr_min_div=10"], "both set LRMIN"),
])
def test_an_impossible_grid_is_one_line_before_anything(cifar_dir, tmp_path, capsys, specs, message):
    out = tmp_path / "sw"
    args = [a for spec in specs for a in ("--vary", spec)]
    code = main(["sweep", *args, "--data-dir", str(cifar_dir), "--no-download", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--point", "flip=true"], "--point flip=true: changes nothing in the recipe"),
    (["--point", "lr_max=0.04", "--point", "lr_max=0.04"], "--point lr_max=0.04: given twice"),
    (["--point", "lr_max=0.04,lr_max=0.08"], "each setting once"),
    (["--point", "lr_max=0.04", "--vary", "flip=true,false"], "a sweep is a grid (--vary) or a list of points"),
    (["--point", "lr_max=0.04", "--baseline", "lr_max=0.04"], "no --baseline with a list"),
    (["--point", "seed=2"], "--point: seed is not varied"),
    (["--point", "dataset=cifar100"], "--point: dataset is not varied: a sweep reads its data once"),
    (["--point", "lr_min=0.1,lr_min_div=10"], "both set LRMIN"),
    (["--point", "lr_maxx=0.1"], "unknown setting 'lr_maxx'"),
    (["--point", "mean=1"], "--point: mean is not varied"),
    (["--vary", "weight_decay=0.0005,0.001", "--baseline", "std=1"], "--baseline: std is not varied"),
])
def test_an_impossible_list_is_one_line_before_anything(cifar_dir, tmp_path, capsys, args, message):
    out = tmp_path / "sw"
    code = main(["sweep", *args, *FIXED, "--lr-max", "0.02", "--data-dir", str(cifar_dir), "--no-download",
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


GOOD_PLAN = {"vary": {}, "first_seed": 0, "seeds": 1, "baseline": None, "points": [{"lr_max": 0.04}]}


@pytest.mark.parametrize("plan, message", [
    ("{", "sweep_plan.json: not a sweep plan (JSONDecodeError"),
    ("[" * 100_000 + "]" * 100_000, "not a sweep plan"),
    ({**GOOD_PLAN, "points": {"lr_max": 0.04}}, "points must be a list"),
    ({**GOOD_PLAN, "points": ["lr_max=0.04"]}, "points must be a list"),
    ({**GOOD_PLAN, "points": [{"lr_max": "fast"}]}, "lr_max: 'fast' is not a float"),
    ({**GOOD_PLAN, "points": [{"rm -rf": 1}]}, "unknown setting 'rm -rf'"),
    ({**GOOD_PLAN, "points": [{"lr_max": 0.04}, {"lr_max": 0.04}]}, "sweep_plan.json: point lr_max=0.04: given twice"),
    ({**GOOD_PLAN, "points": [{"lr_max": 0.02}]}, "changes nothing in the recipe"),
    ({**GOOD_PLAN, "points": [{"lr_max": 0.001 * (i + 1)} for i in range(10_001)]}, "points must be a list"),
    ({**GOOD_PLAN, "points": [{"lr_max": 0.001 * (i + 1)} for i in range(5_000)], "seeds": 2},
     "sweep_plan.json: point: 5001 points x 2 seeds is more than 10000 runs"),
    ({**GOOD_PLAN, "vary": {"flip": [True, False]}}, "a sweep is a grid"),
])
def test_a_crafted_sweep_plan_is_one_line(tmp_path, capsys, plan, message):
    folder = tmp_path / "sw"
    folder.mkdir()
    (folder / "recipe.toml").write_text(SMALL.to_toml())
    (folder / "sweep_plan.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    started = time.perf_counter()
    code = main(["sweep", "--collect", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert time.perf_counter() - started < 30  # a guard against a hang, not a speed test
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.toml", "sweep_plan.json"]  # nothing written


def test_a_plan_of_thousands_of_points_draws_a_bounded_picture(tmp_path):
    from PIL import Image

    from cifar_onecycle.sweep_report import plot_sweep

    lrs = [0.001 * (i + 1) for i in range(3000)]
    listed = Plan({}, 0, 1, listed=[{"lr_max": lr} for lr in lrs if lr != SMALL.lr_max])
    folder = SweepFolder(tmp_path / "list")
    folder.open(listed, SMALL)
    folder.write_results(listed, SMALL)
    with Image.open(folder.path / "sweep.png") as picture:  # its first 100 points: 3,000 were 105,000 pixels tall
        assert picture.height < 5000, picture.size
    grid = Plan({"lr_max": lrs}, 0, 1)
    axes = plot_sweep(grid, [], {"selection": "final_val_acc", "points": [], "baseline": None}).axes[0]
    assert len(axes.get_xticklabels()) <= 30  # matplotlib's own ticks, not 3,000 labels to lay out


def test_a_sweep_collected_before_any_run_ended_says_so_in_its_pictures(tmp_path):
    from cifar_onecycle.sweep_report import NOTHING_YET, plot_sweep, plot_sweep_curves

    def said(fig):
        return [NOTHING_YET in [t.get_text() for t in ax.texts] for ax in fig.axes]

    for plan in (Plan({"lr_max": [0.01, 0.02]}, 0, 1), Plan({}, 0, 1, listed=[{"lr_max": 0.01}])):
        folder = SweepFolder(tmp_path / str(len(list(tmp_path.iterdir()))))
        folder.open(plan, SMALL)
        result = folder.write_results(plan, SMALL)
        assert said(plot_sweep(plan, result.rows, result.stats)) == [True]
        assert said(plot_sweep_curves(plan, {}, result.stats)) == [True, True]
    one = [{"point": "lr_max=0.01", "values": {"lr_max": 0.01}, "seed": 0, "final_test_acc": 0.5}]
    stats = {"selection": "final_test_acc", "points": [], "baseline": None}
    assert said(plot_sweep(Plan({"lr_max": [0.01, 0.02]}, 0, 1), one, stats)) == [False]
    assert said(plot_sweep_curves(plan, {"lr_max=0.01": [(1, 2.0, 0.5)]}, result.stats)) == [False, False]


def numbers(result):
    """A sweep's rows without their times: what two sweeps of the same runs share."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in result.rows]


def write_run(folder, point, seed, val, test, seconds=1.0):
    run = RunFolder(folder.run(point, seed).path)
    run.path.mkdir(parents=True)
    run.write_summary({"final_val_acc": val, "final_val_acc_tta": val + 0.01, "final_test_acc": test,
                       "final_test_acc_tta": test + 0.01, "lr_max": point.recipe(SMALL, seed).lr_max,
                       "lr_min": 1e-4, "total_seconds": seconds, "steps_per_epoch": 4})


def test_the_table_and_statistics_are_those_computed_by_hand(tmp_path):
    plan = Plan({"lr_max": [0.01, 0.02, 0.04]}, first_seed=0, seeds=3, baseline={"lr_max": 0.02})
    folder = SweepFolder(tmp_path / "sw")
    folder.open(plan, SMALL)
    low, base, high = plan.points
    for seed, (a, b) in enumerate([(0.80, 0.85), (0.84, 0.83), (0.82, 0.90)]):
        write_run(folder, low, seed, a, a - 0.05)
        write_run(folder, base, seed, b, b - 0.05)
    write_run(folder, high, 0, 0.70, 0.60)
    RunFolder(folder.run(high, 1).path).path.mkdir(parents=True)
    RunFolder(folder.run(high, 1).path).write_failed("diverged", "training diverged: loss is nan")
    result = folder.write_results(plan, SMALL)
    assert result.remaining == 1  # high, seed 2: not run yet
    rows = list(csv.DictReader((folder.path / "sweep.csv").open()))
    assert [(r["lr_max"], r["seed"], r["final_val_acc"], r["outcome"]) for r in rows] == [
        ("0.01", "0", "0.8", "finished"), ("0.01", "1", "0.84", "finished"), ("0.01", "2", "0.82", "finished"),
        ("0.02", "0", "0.85", "finished"), ("0.02", "1", "0.83", "finished"), ("0.02", "2", "0.9", "finished"),
        ("0.04", "0", "0.7", "finished"), ("0.04", "1", "", "diverged")]
    stats = json.loads((folder.path / "sweep.json").read_text())
    assert stats["selection"] == "final_val_acc" and stats["baseline"] == "lr_max=0.02"
    by_point = {p["point"]: p for p in stats["points"]}
    val = by_point["lr_max=0.01"]["final_val_acc"]
    assert val["n"] == 3 and val["mean"] == pytest.approx(0.82)
    assert val["std"] == pytest.approx(0.02) and val["sem"] == pytest.approx(0.02 / math.sqrt(3))
    # Paired by seed: 0.80-0.85, 0.84-0.83, 0.82-0.90 = -0.05, +0.01, -0.08: mean -0.04, std 0.0458.
    paired = val["paired_difference"]
    assert paired["n"] == 3 and paired["mean"] == pytest.approx(-0.04)
    assert paired["std"] == pytest.approx(math.sqrt((0.01**2 + 0.05**2 + 0.04**2) / 2))
    assert paired["sem"] == pytest.approx(paired["std"] / math.sqrt(3))
    assert "paired_difference" not in by_point["lr_max=0.02"]["final_val_acc"]
    high_stats = by_point["lr_max=0.04"]
    assert high_stats["runs"] == 2 and high_stats["failed"] == 1 and high_stats["outcomes"] == {
        "diverged": 1, "finished": 1}
    assert high_stats["final_val_acc"]["n"] == 1 and high_stats["final_val_acc"]["sem"] is None
    assert high_stats["final_val_acc"]["paired_difference"]["mean"] == pytest.approx(0.70 - 0.85)
    assert (folder.path / "sweep.png").stat().st_size > 10_000
    # sweep.md, the same numbers in %: lr_max=0.02's validation accuracies 0.85, 0.83, 0.90 have a
    # standard deviation of sqrt(0.0026 / 2) = 0.0361, a standard error of 0.0208; TTA 1 point up,
    # test 5 points down (write_run); lr_max=0.04 one seed: no standard error
    page = (folder.path / "sweep.md").read_text()
    assert [line for line in page.splitlines() if line.startswith("| ") and "---" not in line] == [
        "| point | runs | validation % (sem) | vs baseline (sem) | validation with flip TTA % (sem) | test % (sem) "
        "| test with flip TTA % (sem) |",
        "| lr_max=0.01 | 3 | 82.00 (1.15) | -4.00 (2.65) | 83.00 (1.15) | 77.00 (1.15) | 78.00 (1.15) |",
        "| lr_max=0.02 | 3 | 86.00 (2.08) | baseline | 87.00 (2.08) | 81.00 (2.08) | 82.00 (2.08) |",
        "| lr_max=0.04 | 2 (1 diverged) | 70.00 | -15.00 | 71.00 | 60.00 | 61.00 |"]
    assert "from `lr_max=0.02` paired by seed" in page and "1 run has not ended" in page
    assert "Choose on the validation accuracy" in page and "](sweep.png)" in page and "](sweep_curves.png)" in page


def test_a_sweep_without_a_holdout_says_its_numbers_are_the_test_sets_and_shows_the_lrs_found():
    from cifar_onecycle.cli import sweep_table
    from cifar_onecycle.sweep_report import sweep_markdown, sweep_table_rows

    acc = {"n": 2, "mean": 0.9, "std": 0.01, "sem": 0.007}
    stats = {"selection": "final_test_acc", "vary": {"lr_max": [0.2, "auto"]}, "settings": ["lr_max"],
             "seeds": [0, 1], "baseline": "lr_max=0.2", "remaining_runs": 0, "points": [
                 {"point": "lr_max=0.2", "runs": 2, "outcomes": {"finished": 2}, "final_test_acc": acc},
                 {"point": "lr_max=auto", "runs": 2, "outcomes": {"finished": 1, "no LR found": 1},
                  "final_test_acc": {**acc, "paired_difference": {"n": 1, "mean": 0.012, "std": None, "sem": None}},
                  "found": {"lr_max": [0.5123]}}]}
    assert sweep_table_rows(stats) == [
        ["point", "runs", "test % (sem)", "vs baseline (sem)", "test with flip TTA % (sem)", "LRs found, by seed"],
        ["lr_max=0.2", "2", "90.00 (0.70)", "baseline", "-", "-"],
        ["lr_max=auto", "2 (1 no LR found)", "90.00 (0.70)", "+1.20", "-", "lr_max 0.512"]]
    assert [row[:4] for row in sweep_table_rows(stats)] == sweep_table_rows(stats, short=True)
    assert sweep_table(stats).splitlines()[2] == "lr_max=auto  2 (1 no LR found)  90.00 (0.70)  +1.20"  # the CLI's
    page = sweep_markdown(stats)
    assert page.startswith("# Sweep: a grid of lr_max, seeds 0 to 1") and "tunes it to the test set" in page
    assert "runs have not ended" not in page


def write_metrics(folder, point, seed, rows):
    """metrics.csv of a run with a holdout: (train_loss, val_acc) an epoch."""
    RunFolder(folder.run(point, seed).path).write_metrics(
        [EpochMetrics(i + 1, 0.01, loss, 0.5, None, None, 1.0, 100.0, val_loss=1.0, val_acc=acc)
         for i, (loss, acc) in enumerate(rows)])


def test_the_curves_are_each_points_mean_over_the_runs_it_trained(tmp_path):
    from cifar_onecycle.sweep_report import plot_sweep_curves

    plan = Plan({}, first_seed=0, seeds=2, listed=[{"lr_max": 0.04}, {"tta_translate": 1}, {"flip": False}])
    folder = SweepFolder(tmp_path / "sw")
    folder.open(plan, SMALL)
    recipe, faster, translated, flipless = plan.points
    for seed, (loss, acc) in enumerate([(2.0, 0.3), (1.0, 0.5)]):
        write_run(folder, recipe, seed, acc, acc)
        write_metrics(folder, recipe, seed, [(loss, acc), (loss / 2, acc + 0.2)])
        write_run(folder, faster, seed, acc, acc)
        write_metrics(folder, faster, seed, [(loss + 1, acc - 0.1), (loss, acc)])
        write_run(folder, translated, seed, 0.9, 0.9)  # evaluated with the recipe's weights: its curve is theirs
        write_metrics(folder, translated, seed, [(9.0, 0.9), (9.0, 0.9)])
        summary = folder.run(translated, seed).read_summary()
        folder.run(translated, seed).write_summary(summary | {"weights_from": f"recipe/seed{seed}"})
    RunFolder(folder.run(flipless, 0).path).path.mkdir(parents=True)
    RunFolder(folder.run(flipless, 0).path).write_failed("diverged", "training diverged: loss is nan")
    write_metrics(folder, flipless, 0, [(5.0, 0.1)])  # the epochs before it diverged: not a curve
    result = folder.write_results(plan, SMALL)
    curves = folder.mean_curves(plan, result.rows, "val")
    # recipe: losses (2, 1) then (1, 0.5); accuracies (0.3, 0.5) then (0.5, 0.7)
    assert curves == {"recipe": [(1, 1.5, pytest.approx(0.4)), (2, 0.75, pytest.approx(0.6))],
                      "lr_max=0.04": [(1, 2.5, pytest.approx(0.3)), (2, 1.5, pytest.approx(0.4))]}
    accuracy_axes = plot_sweep_curves(plan, curves, result.stats).axes[1]
    drawn = {line.get_label(): list(line.get_ydata()) for line in accuracy_axes.get_lines()}
    assert drawn == {"recipe (baseline)": [pytest.approx(40), pytest.approx(60)],
                     "lr_max=0.04": [pytest.approx(30), pytest.approx(40)]}
    assert (folder.path / "sweep_curves.png").stat().st_size > 10_000
    assert [p.get("weights_from") for p in result.stats["points"]] == [None, None, ["recipe"], None]
    assert "`tta_translate=1` changes only the evaluation: its runs are the weights of `recipe`" in (
        folder.path / "sweep.md").read_text()


def test_a_point_evaluated_on_the_test_set_draws_no_curve_among_validation_ones(tmp_path):
    from cifar_onecycle.sweep_report import plot_sweep_curves

    plan = Plan({}, first_seed=0, seeds=1, listed=[{"holdout": 0}])  # the recipe holds 20 images out
    folder = SweepFolder(tmp_path / "sw")
    folder.open(plan, SMALL)
    recipe, whole = plan.points
    write_run(folder, recipe, 0, 0.5, 0.4)
    write_metrics(folder, recipe, 0, [(2.0, 0.3), (1.0, 0.5)])
    write_run(folder, whole, 0, 0.0, 0.6)  # its summary: not what this test reads
    RunFolder(folder.run(whole, 0).path).write_metrics(  # no holdout: each epoch scored on the test set
        [EpochMetrics(i + 1, 0.01, loss, 0.5, 1.0, acc, 1.0, 100.0) for i, (loss, acc) in enumerate([(1.8, 0.4),
                                                                                                      (0.9, 0.6)])])
    result = folder.write_results(plan, SMALL)
    curves = folder.mean_curves(plan, result.rows, "val")
    assert [(epoch, loss) for epoch, loss, _ in curves["holdout=0"]] == [(1, 1.8), (2, 0.9)]
    assert all(math.isnan(acc) for _, _, acc in curves["holdout=0"])  # test accuracy is no validation accuracy
    assert [acc for _, _, acc in curves["recipe"]] == [0.3, 0.5]
    loss_axes, accuracy_axes = plot_sweep_curves(plan, curves, result.stats).axes[:2]
    drawn = {line.get_label(): list(line.get_ydata()) for line in accuracy_axes.get_lines()}
    label = "holdout=0 (loss only: evaluated on the test set)"
    assert drawn.keys() == {"recipe (baseline)", label} and all(math.isnan(y) for y in drawn[label])
    assert [list(line.get_ydata()) for line in loss_axes.get_lines()] == [[2.0, 1.0], [1.8, 0.9]]


def test_a_lists_table_fills_in_the_recipes_values_and_compares_each_change_with_it(tmp_path):
    plan = Plan({}, first_seed=0, seeds=2, listed=[{"lr_max": 0.04}, {"flip": False, "bn_momentum": 0.3}])
    folder = SweepFolder(tmp_path / "sw")
    folder.open(plan, SMALL)
    recipe, faster, flipless = plan.points
    for seed, (r, a, b) in enumerate([(0.80, 0.83, 0.78), (0.84, 0.85, 0.80)]):
        write_run(folder, recipe, seed, r, r - 0.05)
        write_run(folder, faster, seed, a, a - 0.05)
        write_run(folder, flipless, seed, b, b - 0.05)
    folder.write_results(plan, SMALL)
    rows = list(csv.DictReader((folder.path / "sweep.csv").open()))
    assert [(r["point"], r["lr_max"], r["flip"], r["bn_momentum"], r["seed"], r["final_val_acc"]) for r in rows] == [
        ("recipe", "0.02", "true", "0.5", "0", "0.8"), ("recipe", "0.02", "true", "0.5", "1", "0.84"),
        ("lr_max=0.04", "0.04", "true", "0.5", "0", "0.83"), ("lr_max=0.04", "0.04", "true", "0.5", "1", "0.85"),
        ("flip=false,bn_momentum=0.3", "0.02", "false", "0.3", "0", "0.78"),
        ("flip=false,bn_momentum=0.3", "0.02", "false", "0.3", "1", "0.8")]
    stats = json.loads((folder.path / "sweep.json").read_text())
    assert stats["baseline"] == "recipe" and stats["settings"] == ["lr_max", "flip", "bn_momentum"]
    by_point = {p["point"]: p["final_val_acc"] for p in stats["points"]}
    # paired by seed: 0.83-0.80, 0.85-0.84 = +0.02 on average; 0.78-0.80, 0.80-0.84 = -0.03
    assert by_point["lr_max=0.04"]["paired_difference"]["mean"] == pytest.approx(0.02)
    assert by_point["flip=false,bn_momentum=0.3"]["paired_difference"]["mean"] == pytest.approx(-0.03)
    assert "paired_difference" not in by_point["recipe"]
    assert (folder.path / "sweep.png").stat().st_size > 10_000


def test_another_sweep_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "sw"
    first = sweep(SMALL, {"lr_max": [0.01, 0.02]}, 2, out=out, print_commands=True)
    assert len(first.commands) == 4 and not (out / "lr_max=0.01").exists()
    again = sweep(SMALL, {"lr_max": [0.01, 0.02]}, 2, out=out, print_commands=True)
    assert again.commands == first.commands  # the same sweep: nothing refused
    assert not any("--keep-checkpoint" in line for line in first.commands)
    kept = sweep(SMALL, {"lr_max": [0.01, 0.02]}, 2, out=out, print_commands=True, keep_checkpoint=True)
    assert kept.commands == [line + " --keep-checkpoint" for line in first.commands]
    for changed in [dict(vary={"lr_max": [0.01, 0.04]}, seeds=2), dict(vary={"lr_max": [0.01, 0.02]}, seeds=3)]:
        with pytest.raises(Exception, match="holds another sweep"):
            sweep(SMALL, out=out, print_commands=True, **changed)
    with pytest.raises(Exception, match=r"holds another sweep \(its recipe differs in epochs: 2 there, 3 here\)"):
        sweep(SMALL.replace(epochs=3), {"lr_max": [0.01, 0.02]}, 2, out=out, print_commands=True)
    # a default that changed between versions (eval_batch_size's, 1000 before 0) is named too
    with pytest.raises(Exception, match=r"its recipe differs in eval_batch_size: 16 there, 0 here"):
        sweep(SMALL.replace(eval_batch_size=0), {"lr_max": [0.01, 0.02]}, 2, out=out, print_commands=True)


@pytest.mark.slow
def test_a_sweep_stopped_mid_run_resumes_to_the_table_of_one_never_stopped(cifar_dir, tmp_path, monkeypatch):
    vary = {"lr_max": [0.01, 0.02]}
    whole = sweep(SMALL, vary, 1, out=tmp_path / "whole", data_dir=cifar_dir, download=False, progress=False)
    assert [(r["point"], r["seed"]) for r in whole.rows] == [("lr_max=0.01", 0), ("lr_max=0.02", 0)]
    out = tmp_path / "cut"
    monkeypatch.setenv("CIFAR_ONECYCLE_TEST_SIGNALS", "SIGINT@4")  # the first run's epoch 2, step 2 of 3
    with pytest.raises(Interrupted, match="run the same sweep again"):
        sweep(SMALL, vary, 1, out=out, data_dir=cifar_dir, download=False, progress=False)
    first = SweepFolder(out).run(SweepFolder(out).read()[0].points[0], 0)
    assert first.has("checkpoint.pt") and not first.has("summary.json")
    monkeypatch.delenv("CIFAR_ONECYCLE_TEST_SIGNALS")
    steps = []
    step = RunSetup.step
    monkeypatch.setattr(RunSetup, "step", lambda self, *args: steps.append(1) or step(self, *args))
    resumed = sweep(SMALL, vary, 1, out=out, data_dir=cifar_dir, download=False, progress=False)
    assert len(steps) == 2 * 2 * 3 - 5  # 2 runs of 2 epochs of 3 steps, less the 5 the stopped run had taken

    assert numbers(resumed) == numbers(whole) and resumed.remaining == 0
    assert not list(out.glob("*/seed*/checkpoint.pt"))  # each removed as its run ended
    # The same sweep once more trains nothing: the finished runs are read back.
    finished = (first.path / "model.safetensors").stat().st_mtime_ns
    assert numbers(sweep(SMALL, vary, 1, out=out, data_dir=cifar_dir, download=False, progress=False)) == numbers(whole)
    assert (first.path / "model.safetensors").stat().st_mtime_ns == finished


@pytest.mark.slow
def test_a_stop_while_a_point_is_evaluated_again_says_how_to_go_on(cifar_dir, tmp_path, monkeypatch):
    def stopped(*args, **kwargs):  # as Ctrl-C there would: outside a training run no stop handler catches it
        raise KeyboardInterrupt
    evaluate = evaluation.evaluate_recipe
    monkeypatch.setattr(evaluation, "evaluate_recipe", stopped)  # the evaluations again alone call this name
    out = tmp_path / "sw"
    try:
        sweep(SMALL, points=[{"tta_translate": 1}], out=out, data_dir=cifar_dir, download=False, progress=False)
        stop = "no stop"
    except Interrupted as e:
        stop = str(e)
    except KeyboardInterrupt:  # caught here: one escaping a test would end the whole test session
        stop = "KeyboardInterrupt, unhandled"
    assert "tta_translate=1 seed 0 was being evaluated with recipe's weights; run the same sweep again" in stop, stop
    assert not RunFolder(out / "tta_translate=1" / "seed0").has("summary.json")
    monkeypatch.setattr(evaluation, "evaluate_recipe", evaluate)
    steps = []
    step = RunSetup.step
    monkeypatch.setattr(RunSetup, "step", lambda self, *args: steps.append(1) or step(self, *args))
    result = sweep(SMALL, points=[{"tta_translate": 1}], out=out, data_dir=cifar_dir, download=False, progress=False)
    assert steps == [] and [(r["point"], r["weights_from"]) for r in result.rows] == [
        ("recipe", None), ("tta_translate=1", "recipe/seed0")]


@pytest.mark.slow
def test_a_diverging_point_is_recorded_and_the_sweep_goes_on(cifar_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    code = main(["sweep", "--vary", "lr_max=0.02,1e6", *FIXED, "--data-dir", str(cifar_dir),
                 "--no-download", "--out", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "lr_max=1000000.0  1 (1 diverged)" in table and "lr_max=0.02" in table
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["lr_max"], r["outcome"]) for r in rows] == [("0.02", "finished"), ("1000000.0", "diverged")]
    assert RunFolder(out / "lr_max=1000000.0" / "seed0").read_failed()[0] == "diverged"


@pytest.mark.slow
def test_printed_commands_run_as_printed_and_collect_reads_their_folders(cifar_dir, tmp_path, capsys):
    vary = {"lr_max": [0.01, 0.02]}
    here = sweep(SMALL, vary, 1, out=tmp_path / "here", data_dir=cifar_dir, download=False, progress=False)
    out = tmp_path / "there"
    assert main(["sweep", "--vary", "lr_max=0.01,0.02", *FIXED, "--data-dir", str(cifar_dir),
                 "--no-download", "--out", str(out), "--print-commands"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2 and all(c.startswith("cifar-onecycle train ") for c in commands)
    for command in commands:  # as a job array would, from another folder
        args = shlex.split(command)[1:]
        subprocess.run([sys.executable, "-m", "cifar_onecycle", *args, "--quiet"], cwd=tmp_path, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    collected = collect(out)
    assert collected.remaining == 0

    assert numbers(collected) == numbers(here)  # the same runs as the sweep trained itself
    assert main(["sweep", "--collect", str(out)]) == 0
    assert "lr_max=0.02  1     " in capsys.readouterr().out
    for name in ("lr_max=0.01", "lr_max=0.02"):
        assert (out / name / "seed0" / "recipe.toml").read_text() == (tmp_path / "here" / name / "seed0" /
                                                                      "recipe.toml").read_text()


@pytest.mark.slow
def test_two_workers_train_the_same_runs(cifar_dir, tmp_path):
    vary = {"lr_max": [0.01, 0.02], "tta_translate": [0, 1]}  # the tta_translate=1 points evaluated, not trained
    # Each of two workers on this machine's cores gets its share of them (worker_environment): on 2
    # cores one thread. This process, which trains the runs of one worker and evaluates again those of
    # two, gets as many, since another thread count may sum a convolution in another order (on an
    # Intel Xeon with AMX one TTA prediction of 30 differed).
    threads = int(worker_environment(0, 2).get("OMP_NUM_THREADS", torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one = sweep(SMALL, vary, 1, out=tmp_path / "one", data_dir=cifar_dir, download=False, progress=False)
        two = sweep(SMALL, vary, 1, out=tmp_path / "two", data_dir=cifar_dir, download=False, progress=False,
                    workers=2)
    finally:
        torch.set_num_threads(before)

    assert numbers(two) == numbers(one) and two.remaining == 0


def test_a_stop_reaches_each_worker_once(cifar_dir, tmp_path, monkeypatch):
    """A run stopping takes a while (its checkpoint); a second signal in that time would stop it at
    once, without one. Workers here are stand-ins that take a second to stop."""
    signals: dict[int, list[int]] = {}

    class SlowToStop:
        def __init__(self, command, **kwargs):
            self.pid, self.stopped_at = len(signals), None
            signals[self.pid] = []
            if self.pid == 1:  # both workers have started: the user presses Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)

        def send_signal(self, sig):
            signals[self.pid].append(sig)
            self.stopped_at = self.stopped_at or time.monotonic()

        def poll(self):
            return 130 if self.stopped_at and time.monotonic() - self.stopped_at > 1.0 else None

    monkeypatch.setattr(subprocess, "Popen", SlowToStop)
    with pytest.raises(Interrupted, match="stopped by SIGINT"):
        sweep(SMALL, {"lr_max": [0.01, 0.02]}, 1, out=tmp_path / "sw", data_dir=cifar_dir, download=False,
              progress=False, workers=2)
    assert signals == {0: [signal.SIGINT], 1: [signal.SIGINT]}


def test_on_windows_a_stop_is_left_to_the_console(cifar_dir, tmp_path, monkeypatch):
    """Windows gives each process of the console its own Ctrl-C, and its Popen.send_signal refuses
    SIGINT: the workers stop by themselves, and the sweep sends nothing. Stand-ins imitate both."""
    sweep_module = importlib.import_module("cifar_onecycle.sweep")  # the package's `sweep` is the function
    workers: list = []

    class WindowsWorker:
        def __init__(self, command, **kwargs):
            self.stopped_at = None
            workers.append(self)
            if len(workers) == 2:  # both have started: the user presses Ctrl-C, which the console gives all
                for worker in workers:
                    worker.stopped_at = time.monotonic()
                os.kill(os.getpid(), signal.SIGINT)

        def send_signal(self, sig):
            raise ValueError(f"Unsupported signal: {sig}")  # as Windows' Popen says of SIGINT

        def poll(self):
            return 130 if self.stopped_at and time.monotonic() - self.stopped_at > 0.5 else None

    monkeypatch.setattr(subprocess, "Popen", WindowsWorker)
    monkeypatch.setattr(sweep_module, "PASS_SIGNALS_ON", False)
    with pytest.raises(Interrupted, match="stopped by SIGINT"):
        sweep(SMALL, {"lr_max": [0.01, 0.02]}, 1, out=tmp_path / "sw", data_dir=cifar_dir, download=False,
              progress=False, workers=2)
    assert len(workers) == 2


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [True, False])
def test_a_stop_signal_stops_every_worker_and_the_same_sweep_goes_on(cifar_dir, tmp_path, checkpoints):
    # 6 epochs of 3 steps: the signal comes once both runs have ended an epoch, 15 steps (about 7 s
    # on a core of an AVX2-only CPU) before their end
    recipe = SMALL.replace(epochs=6)
    vary = {"lr_max": [0.01, 0.02]}
    out = tmp_path / "cut"
    command = [sys.executable, "-m", "cifar_onecycle", "sweep", "--vary", "lr_max=0.01,0.02",
               *recipe_flags(recipe.replace(lr_max=Recipe().lr_max)), "--data-dir", str(cifar_dir),
               "--no-download", "--out", str(out), "--workers", "2", "--quiet",
               *([] if checkpoints else ["--no-checkpoint"])]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    runs = [out / f"lr_max={lr}" / "seed0" for lr in (0.01, 0.02)]
    while not all((run / "metrics.csv").exists() for run in runs) and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]

    assert process.returncode == 130 and "Traceback" not in err, err
    assert f"sweep {out} stopped by SIGINT" in err.splitlines()[-1], err
    assert all(not (run / "summary.json").exists() and not (run / "failed.json").exists() for run in runs)
    if not checkpoints:
        assert "will start again" in err and not any((run / "checkpoint.pt").exists() for run in runs), err
        return
    assert "saved its checkpoint" in err and all((run / "checkpoint.pt").exists() for run in runs), err
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})  # the same command
    resumed = collect(out)
    whole = sweep(recipe.replace(lr_max=Recipe().lr_max), vary, 1, out=tmp_path / "whole", data_dir=cifar_dir,
                  download=False, progress=False)
    assert resumed.remaining == 0 and numbers(resumed) == numbers(whole)


@pytest.mark.slow
def test_a_list_sweep_trains_each_change_as_its_flags_would(cifar_dir, tmp_path, capsys):
    out = tmp_path / "sw"
    code = main(["sweep", "--point", "lr_max=0.04", "--point", "flip=false,bn_momentum=0.3", *FIXED, "--lr-max",
                 "0.02", "--data-dir", str(cifar_dir), "--no-download", "--out", str(out), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    assert "recipe                      1     " in table and "baseline" in table
    assert "flip=false,bn_momentum=0.3  1     " in table
    expected = {"recipe": SMALL, "lr_max=0.04": SMALL.replace(lr_max=0.04),
                "flip=false,bn_momentum=0.3": SMALL.replace(flip=False, bn_momentum=0.3)}
    for name, recipe in expected.items():
        trained = load_recipe(out / name / "seed0" / "recipe.toml")
        assert trained == recipe.replace(**{k: getattr(trained, k) for k in DATA_FIELDS}), name
    assert [r["point"] for r in csv.DictReader((out / "sweep.csv").open())] == list(expected)


@pytest.mark.slow
def test_a_point_that_changes_only_the_evaluation_is_evaluated_not_trained(cifar_dir, tmp_path, monkeypatch):
    import cifar_onecycle.report as report

    steps, translations, own_passes = [], [], []
    step, evaluate, predict = RunSetup.step, evaluation.evaluate_recipe, report.predict_probabilities
    monkeypatch.setattr(RunSetup, "step", lambda self, *args: steps.append(1) or step(self, *args))
    # the runs' own evaluations call the name run_setup imported: this sees the evaluations again alone
    # (its fourth argument: the recipe they score with)
    monkeypatch.setattr(evaluation, "evaluate_recipe", lambda *a, **k: translations.append(a[3].tta_translate)
                        or evaluate(*a, **k))
    monkeypatch.setattr(report, "predict_probabilities", lambda *a, **k: own_passes.append(1) or predict(*a, **k))
    recipe = SMALL.replace(seed=1)  # on this data its TTA scores 0.667 with shifts, 0.733 without (test set)
    sweep(recipe, points=[{"lr_max": 1e6}], out=tmp_path / "trained", data_dir=cifar_dir, download=False,
          progress=False)
    trainings = len(steps)
    out = tmp_path / "sw"
    result = sweep(recipe, points=[{"tta_translate": 2}, {"lr_max": 1e6}, {"lr_max": 1e6, "tta_translate": 2}],
                   out=out, data_dir=cifar_dir, download=False, progress=False, report=True)
    assert len(steps) == 2 * trainings  # the two points that differ in tta_translate alone trained nothing
    assert translations == [2, 2]  # the validation split and the test set, with the point's own shifts
    # every report drew its predictions from its run's own test-set pass, the evaluated-again one too
    assert (out / "tta_translate=2" / "seed1" / "confusion.png").exists() and own_passes == []
    assert [(r["point"], r["outcome"], r["weights_from"]) for r in result.rows] == [
        ("recipe", "finished", None), ("tta_translate=2", "finished", "recipe/seed1"),
        ("lr_max=1000000.0", "diverged", None), ("lr_max=1000000.0,tta_translate=2", "diverged", None)]
    assert "it trains as lr_max=1000000.0" in RunFolder(out / "lr_max=1000000.0,tta_translate=2" /
                                                         "seed1").read_failed()[1]

    alone = tmp_path / "alone"  # the same point trained
    train(recipe.replace(tta_translate=2), data_dir=cifar_dir, download=False, out=alone, progress=False)
    evaluated = RunFolder(out / "tta_translate=2" / "seed1")
    summary, expected = evaluated.read_summary(), RunFolder(alone).read_summary()
    assert {k: summary[k] for k in ACCURACIES} == {k: expected[k] for k in ACCURACIES}
    assert summary["weights_from"] == "recipe/seed1"
    assert evaluated.read_recipe() == RunFolder(alone).read_recipe()
    assert [(m.epoch, m.train_loss, m.eval_acc) for m in evaluated.read_metrics()] == [
        (m.epoch, m.train_loss, m.eval_acc) for m in RunFolder(alone).read_metrics()]
    weights = load_file(evaluated.path / "model.safetensors")
    assert all(torch.equal(t, load_file(alone / "model.safetensors")[k]) for k, t in weights.items())
    assert "weights_from" in (out / "sweep.csv").read_text().splitlines()[0]
