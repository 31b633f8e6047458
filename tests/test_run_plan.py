"""``train --dry-run`` and ``sweep --dry-run``: the run (each point's) set up as ``train`` would, a
few steps timed, its plan and estimate printed; nothing trained further and nothing written."""
from __future__ import annotations

import statistics

import pytest

from cifar_onecycle import Recipe, UserError, sweep
from cifar_onecycle.cli import main
from cifar_onecycle.lr_finder import DEFAULT_EPOCHS
from cifar_onecycle.run_plan import TIMED_STEPS, PointPlan, RunPlan, SweepDryRun, dry_run, dry_run_sweep
from cifar_onecycle.sweep_plan import Plan, Point
from conftest import recipe_flags

TINY = Recipe(epochs=3, peak_epoch=1, batch_size=20, eval_batch_size=8, device="cpu", precision="fp32", lr_max=0.01,
              logit_scale=0.125, holdout=20)


def test_the_plan_counts_what_the_run_would_train_and_the_estimate_adds_up(cifar_dir):
    plan = dry_run(TINY, data_dir=cifar_dir, download=False)
    # 100 training images: 20 held out, 80 trained on in 4 steps of 20; 30 test images
    assert (plan.train_images, plan.val_images, plan.test_images) == (80, 20, 30)
    assert (plan.steps_per_epoch, plan.total_steps, plan.range_test_steps) == (4, 12, 0)
    assert plan.cycle.lr_knots == TINY.one_cycle(4).lr_knots
    assert plan.recipe.class_names is not None  # the recipe as the run records it: the data's settings filled in
    assert (plan.device.split()[0], plan.precision) == ("cpu", "fp32")
    assert len(plan.step_seconds) >= 1 + TIMED_STEPS and all(t > 0 for t in plan.step_seconds)
    # the first step (allocation, compilation) left out of the median
    assert plan.training_seconds == pytest.approx(statistics.median(plan.step_seconds[1:]) * 12)
    # each epoch evaluates the 20 held-out images, 8 at a time, at the timed batch's speed
    assert plan.eval_batch_images == 8
    assert plan.evaluation_seconds == pytest.approx(3 * 20 / 8 * plan.eval_batch_seconds)
    assert plan.estimated_seconds == pytest.approx(plan.training_seconds + plan.evaluation_seconds)


def test_the_range_test_of_auto_settings_is_counted_at_its_sweeps_full_length(cifar_dir):
    plan = dry_run(TINY, data_dir=cifar_dir, download=False, find_lr_max=True)
    assert plan.range_test_steps == round(DEFAULT_EPOCHS["linear"] * 4)  # LRMAX: the linear sweep alone
    assert plan.range_test_seconds == pytest.approx(statistics.median(plan.step_seconds[1:]) * plan.range_test_steps)
    assert plan.estimated_seconds == pytest.approx(plan.range_test_seconds + plan.training_seconds
                                                   + plan.evaluation_seconds)
    both = dry_run(TINY, data_dir=cifar_dir, download=False, find_lr_max=True, find_lr_min=True)
    assert both.range_test_steps == round(DEFAULT_EPOCHS["linear"] * 4) + round(DEFAULT_EPOCHS["exp"] * 4)


def test_a_dry_run_writes_nothing_and_prints_the_plan(cifar_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", "--dry-run", "--out", "run", "--seeds", "2", "--data-dir", str(cifar_dir), "--no-download",
                 *recipe_flags(TINY)]) == 0
    assert main(["train", "--dry-run", "--out", "run", "--data-dir", str(cifar_dir), "--no-download",
                 *recipe_flags(TINY), "--lr-max", "auto"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no runs/
    out = capsys.readouterr().out
    assert "dry run: nothing trained or written" in out
    assert "80 training images, 20 held out for validation, 30 test images" in out
    assert "3 epochs of 4 steps of 20: 12 steps" in out
    assert "for the 2 seeds" in out
    assert f"lr_max auto: the run's LR range test finds it first, in at most {round(DEFAULT_EPOCHS['linear'] * 4)} " \
           "steps" in out


def test_a_dry_run_refuses_what_the_run_would_refuse(cifar_dir, capsys):
    assert main(["train", "--dry-run", "--data-dir", str(cifar_dir), "--no-download",
                 *recipe_flags(TINY.replace(holdout=95))]) == 2
    assert "--holdout 95" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--resume", "somewhere"]) == 2
    assert "--dry-run plans a new run; leave out --resume" in capsys.readouterr().err
    assert main(["train", "--dry-run", "--seeds", "0", "--data-dir", str(cifar_dir), "--no-download"]) == 2
    assert "--seeds 0: give at least 1" in capsys.readouterr().err


SWEPT = TINY.replace(holdout=0)  # 100 training images: 5 steps of 20, 10 of 10


def test_a_sweeps_dry_run_times_one_point_of_each_kind_of_step_and_counts_each_ones_runs(cifar_dir, tmp_path):
    planned = dry_run_sweep(SWEPT, {"lr_max": [0.01, 0.02], "batch_size": [20, 10]}, 2, out=tmp_path / "sw",
                            data_dir=cifar_dir, download=False)
    assert not (tmp_path / "sw").exists()  # nothing written
    names = [p.point.name for p in planned.points]
    assert names == ["lr_max=0.01,batch_size=20", "lr_max=0.01,batch_size=10", "lr_max=0.02,batch_size=20",
                     "lr_max=0.02,batch_size=10"]
    a, b, c, d = planned.points
    # the LR changes no step's work: its points take the timings of the first with their batch
    assert (a.timed_as, b.timed_as, c.timed_as, d.timed_as) == (None, None, a.point, b.point)
    assert c.run.step_seconds == a.run.step_seconds and d.run.step_seconds == b.run.step_seconds
    assert a.run.step_seconds != b.run.step_seconds
    assert [p.run.total_steps for p in planned.points] == [15, 30, 15, 30]
    assert [p.run.recipe.lr_max for p in planned.points] == [0.01, 0.01, 0.02, 0.02]
    assert (planned.runs, planned.ended, planned.at_once) == (8, 0, 1)
    assert planned.estimated_seconds == pytest.approx(2 * sum(p.run.estimated_seconds for p in planned.points))


def test_a_sweeps_dry_run_counts_what_its_folder_has_left_and_reads_a_twin_or_auto_as_the_sweep_would(
        cifar_dir, tmp_path):
    out = tmp_path / "sw"
    listed = [{"tta_translate": 1}, {"lr_max": "auto"}]
    sweep(SWEPT, points=listed, seeds=2, out=out, print_commands=True)  # the folder, nothing trained
    (out / "recipe" / "seed0").mkdir(parents=True)
    (out / "recipe" / "seed0" / "summary.json").write_text("{}")  # the recipe's seed 0 ended
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    planned = dry_run_sweep(SWEPT, points=listed, seeds=2, out=out, data_dir=cifar_dir, download=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    recipe, twin, auto = planned.points
    assert (recipe.runs, twin.runs, auto.runs, planned.ended) == (1, 2, 2, 1)
    assert twin.run is None and twin.evaluated_as == recipe.point  # evaluated again, not trained
    assert auto.timed_as == recipe.point and auto.run.range_test_steps == round(DEFAULT_EPOCHS["linear"] * 5)
    assert planned.estimated_seconds == pytest.approx(recipe.run.estimated_seconds + 2 * auto.run.estimated_seconds)
    with pytest.raises(UserError, match="holds another sweep"):
        dry_run_sweep(SWEPT, points=listed, seeds=3, out=out, data_dir=cifar_dir, download=False)
    (tmp_path / "a-file").write_text("someone's")
    with pytest.raises(UserError, match="a-file: exists and is not a folder"):  # as the sweep would refuse it
        dry_run_sweep(SWEPT, points=listed, seeds=2, out=tmp_path / "a-file", data_dir=cifar_dir, download=False)


def test_sweep_dry_run_prints_the_plan_and_writes_nothing(cifar_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["sweep", "--dry-run", "--vary", "lr_max=0.01,0.02", "--seeds", "2", "--data-dir", str(cifar_dir),
                 "--no-download", "--quiet", *recipe_flags(SWEPT.replace(lr_max=Recipe().lr_max))]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no sweep folder, no runs/
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "dry run: nothing trained or written"
    assert "2 points x seeds 0 to 1: 4 runs to do" in out
    assert [line.split()[:3] for line in out[4:6]] == [["lr_max=0.01", "2", "15"], ["lr_max=0.02", "2", "15"]]
    assert out[6].startswith("timed lr_max=0.01: ") and out[6].endswith("; the same work a step: lr_max=0.02")
    assert out[7].startswith("about ") and "for the 4 runs, one at a time" in out[7]
    assert main(["sweep", "--dry-run", "--print-commands", "--vary", "lr_max=0.01,0.02"]) == 2
    assert "leave out --print-commands" in capsys.readouterr().err
    assert main(["sweep", "--dry-run", "--collect", "somewhere"]) == 2
    assert "--dry-run" in capsys.readouterr().err
    for dry in (["--dry-run"], []):  # one check of the workers for the sweep and its dry run
        assert main(["sweep", *dry, "--workers", "0", "--vary", "lr_max=0.01,0.02", "--out", "sweep"]) == 2
        assert "--workers 0: give at least 1" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_sweeps_runs_are_handed_to_the_first_free_worker_in_the_sweeps_order():
    def planned(step: float) -> RunPlan:  # 10 steps at ``step`` seconds, evaluations free
        return RunPlan(Recipe(epochs=1, peak_epoch=1), "cuda", "bf16", 100, 0, 10, 10, 0, 1.0, [5.0, step, step], 10,
                       0.0)

    a, b, c = Point((("lr_max", 0.1),)), Point((("lr_max", 0.2),)), Point((("tta_translate", 1),))
    points = [PointPlan(a, 2, planned(1.0)), PointPlan(b, 2, planned(2.0)), PointPlan(c, 2, None, evaluated_as=a)]
    assert [p.estimated_seconds for p in points] == [20.0, 40.0, 0.0]
    plan = Plan({"lr_max": [0.1, 0.2]}, 0, 2)

    def seconds(at_once: int) -> float:
        return SweepDryRun(plan, points, at_once).estimated_seconds

    # seed 0: a (10 s) and b (20 s) on two workers; seed 1: a to the first free, then b to the first free
    assert (seconds(1), seconds(2), seconds(4)) == (60.0, 40.0, 20.0)
