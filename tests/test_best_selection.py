"""benchmarks/best_selection.py: the selection rules for `best`, on sweeps of made-up results."""
import sys

import pytest

from cifar_onecycle import Recipe
from cifar_onecycle.run_folder import RunFolder
from cifar_onecycle.sweep import SweepFolder
from cifar_onecycle.sweep_plan import Plan
from conftest import ROOT
from test_train import TINY

sys.path.insert(0, str(ROOT / "benchmarks"))
from best_selection import SelectionError, best_recipe, final_args, stage2  # noqa: E402

BASE = Recipe(**{**TINY, "batch_size": 32}, holdout=20)


def list_sweep(folder, changes, results, base=BASE):
    """A list sweep whose runs ended with ``results``: {point name: [(val, val_tta) per seed]}."""
    plan = Plan({}, first_seed=0, seeds=2, listed=changes)
    sweep = SweepFolder(folder)
    sweep.open(plan, base)
    for point in plan.points:
        for seed, (val, val_tta) in enumerate(results[point.name]):
            run = RunFolder(sweep.run(point, seed).path)
            run.path.mkdir(parents=True)
            run.write_summary({"final_val_acc": val, "final_val_acc_tta": val_tta, "final_test_acc": 0.5,
                               "final_test_acc_tta": 0.5, "lr_max": 0.02, "lr_min": 1e-4, "total_seconds": 1.0,
                               "steps_per_epoch": 4})
    sweep.write_results(plan, base)
    return folder


STAGE1 = [{"flip_alternate": True}, {"tta_translate": 1}, {"tta_translate": 2}, {"bn_ghost_batch": 8},
          {"bn_ghost_batch": 16}, {"bn_scale_frozen": True}, {"bn_scale_frozen": True, "bn_bias_lr_mult": 16.0},
          {"label_smoothing": 0.2}]


def test_stage2_takes_each_candidate_that_helped_at_its_best_point(tmp_path):
    results = {
        "recipe": [(0.80, 0.81), (0.82, 0.83)],
        "flip_alternate=true": [(0.81, 0.80), (0.83, 0.80)],          # +0.01: helped
        "tta_translate=1": [(0.80, 0.82), (0.82, 0.84)],              # judged with TTA: +0.01
        "tta_translate=2": [(0.80, 0.83), (0.82, 0.85)],              # +0.02: its best point
        "bn_ghost_batch=8": [(0.79, 0.90), (0.81, 0.90)],             # -0.01 (its TTA is not its judge)
        "bn_ghost_batch=16": [(0.80, 0.81), (0.82, 0.83)],            # 0: not above
        "bn_scale_frozen=true": [(0.81, 0.81), (0.83, 0.83)],         # +0.01
        "bn_scale_frozen=true,bn_bias_lr_mult=16.0": [(0.83, 0.8), (0.83, 0.8)],  # +0.02: its best point
        "label_smoothing=0.2": [(0.75, 0.9), (0.90, 0.9)],            # +0.015 on average: helped
    }
    recipe, leave_out, chosen, set_aside = stage2(list_sweep(tmp_path / "s1", STAGE1, results))
    assert set_aside == []
    assert [j.point.name for j in chosen] == ["flip_alternate=true", "tta_translate=2",
                                              "bn_scale_frozen=true,bn_bias_lr_mult=16.0", "label_smoothing=0.2"]
    assert [round(j.difference, 6) for j in chosen] == [0.01, 0.02, 0.02, 0.015]
    assert recipe == BASE.replace(flip_alternate=True, tta_translate=2, bn_scale_frozen=True, bn_bias_lr_mult=16.0,
                                  label_smoothing=0.2)
    assert leave_out == [{"flip_alternate": False}, {"tta_translate": 0},
                         {"bn_scale_frozen": False, "bn_bias_lr_mult": 1.0}, {"label_smoothing": 0.0}]


def test_of_two_points_that_change_one_setting_the_larger_difference_goes_on(tmp_path):
    lookahead = {"ema_decay": 0.95, "ema_lookahead": True, "bn_momentum": 0.6}
    changes = [{"bn_momentum": 0.3}, {"ema_decay": 0.99}, lookahead, {"label_smoothing": 0.2}]
    results = {
        "recipe": [(0.80, 0.8), (0.80, 0.8)],
        "bn_momentum=0.3": [(0.81, 0.8), (0.81, 0.8)],                          # +0.01
        "ema_decay=0.99": [(0.815, 0.8), (0.815, 0.8)],                         # +0.015
        "ema_decay=0.95,ema_lookahead=true,bn_momentum=0.6": [(0.82, 0.8), (0.82, 0.8)],  # +0.02: ema_decay's best
        "label_smoothing=0.2": [(0.81, 0.8), (0.81, 0.8)],                      # +0.01
    }
    recipe, leave_out, chosen, set_aside = stage2(list_sweep(tmp_path / "s1", changes, results))
    assert [j.point.name for j in chosen] == ["ema_decay=0.95,ema_lookahead=true,bn_momentum=0.6",
                                              "label_smoothing=0.2"]
    assert [(j.point.name, other.point.name) for j, other in set_aside] == [
        ("bn_momentum=0.3", "ema_decay=0.95,ema_lookahead=true,bn_momentum=0.6")]
    assert recipe == BASE.replace(label_smoothing=0.2, **lookahead)
    assert leave_out == [{"ema_decay": 0.0, "ema_lookahead": False, "bn_momentum": BASE.bn_momentum},
                         {"label_smoothing": 0.0}]


def test_best_keeps_a_candidate_only_if_leaving_it_out_costs(tmp_path):
    combined = BASE.replace(flip_alternate=True, tta_translate=2, label_smoothing=0.2)
    leave_out = [{"flip_alternate": False}, {"tta_translate": 0}, {"label_smoothing": 0.0}]
    results = {
        "recipe": [(0.85, 0.86), (0.85, 0.86)],
        "flip_alternate=false": [(0.84, 0.9), (0.85, 0.9)],   # -0.005: leaving it out costs, it stays
        "tta_translate=0": [(0.85, 0.86), (0.85, 0.86)],      # 0 with TTA: it goes
        "label_smoothing=0.0": [(0.86, 0.8), (0.85, 0.8)],    # +0.005: it goes
    }
    stage2_folder = list_sweep(tmp_path / "s2", leave_out, results, combined)
    recipe, kept, dropped = best_recipe(stage2_folder)
    assert [j.candidate for j in kept] == ["flip_alternate"]
    assert [j.candidate for j in dropped] == ["tta_translate", "label_smoothing"]
    assert recipe == BASE.replace(flip_alternate=True)
    # the final: dawnbench against best's changes to it, on the test set, 8 seeds
    # and seed's, which is dawnbench with the seed's LRs and logit scale
    assert final_args(stage2_folder) == ["--recipe", "dawnbench", "--holdout", "0", "--seeds", "8",
                                         "--point", "flip_alternate=true",
                                         "--point", "lr_min=0.0001,lr_max=0.2,logit_scale=1.0"]


def test_no_final_when_stage2_keeps_nothing(tmp_path):
    combined = BASE.replace(flip_alternate=True)
    results = {"recipe": [(0.85, 0.86), (0.85, 0.86)], "flip_alternate=false": [(0.86, 0.9), (0.85, 0.9)]}
    with pytest.raises(SelectionError, match="kept no candidate"):
        final_args(list_sweep(tmp_path / "s2", [{"flip_alternate": False}], results, combined))


def test_a_sweep_with_runs_left_is_not_judged(tmp_path):
    results = {"recipe": [(0.8, 0.8), (0.8, 0.8)], "flip_alternate=true": [(0.9, 0.9)]}  # its seed 1 not run
    with pytest.raises(SelectionError, match="1 runs left to train"):
        stage2(list_sweep(tmp_path / "s1", [{"flip_alternate": True}], results))


def test_no_stage2_without_a_candidate_above_the_recipe(tmp_path):
    results = {"recipe": [(0.8, 0.8), (0.8, 0.8)], "flip_alternate=true": [(0.8, 0.8), (0.79, 0.8)]}
    with pytest.raises(SelectionError, match="no candidate is above the recipe"):
        stage2(list_sweep(tmp_path / "s1", [{"flip_alternate": True}], results))
