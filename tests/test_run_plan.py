"""``train --dry-run``: the run set up as ``train`` would, a few steps timed, its plan and estimate
printed; nothing trained further and nothing written."""
from __future__ import annotations

import statistics

import pytest

from cifar_onecycle import Recipe
from cifar_onecycle.cli import main
from cifar_onecycle.lr_finder import DEFAULT_EPOCHS
from cifar_onecycle.run_plan import TIMED_STEPS, dry_run
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
