import pytest
import torch

from cifar_onecycle import Recipe, lr_at, one_cycle_knots


def test_seed_knots_exact():
    # 50,000 images / 512 = 97 full batches per epoch.
    assert one_cycle_knots(24, 97, 5, 1e-4, 0.2) == [(0, 1e-4), (5 * 97 - 1, 0.2), (24 * 97 - 1, 1e-4)]


def test_points():
    knots = one_cycle_knots(24, 97, 5, 1e-4, 0.2)
    assert lr_at(0, knots) == 1e-4                       # first step
    assert lr_at(5 * 97 - 1, knots) == 0.2                # peak: the last step of epoch 5
    assert lr_at(24 * 97 - 1, knots) == 1e-4              # last step: back at LRMIN, no annihilation
    assert lr_at(5 * 97 - 1 - 242, knots) == pytest.approx(1e-4 + (0.2 - 1e-4) * 242 / 484)
    assert min(lr_at(s, knots) for s in range(24 * 97)) == 1e-4  # never below LRMIN


def test_matches_torch_onecycle_every_step():
    r, spe = Recipe(), 97
    total = r.epochs * spe
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=r.lr_max)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=r.lr_max, total_steps=total, pct_start=r.peak_epoch / r.epochs,
        div_factor=r.lr_max / r.lr_min, final_div_factor=1.0, anneal_strategy="linear",
        three_phase=False, cycle_momentum=False)
    knots = one_cycle_knots(r.epochs, spe, r.peak_epoch, r.lr_min, r.lr_max)
    for step in range(total):
        assert lr_at(step, knots) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), step
        opt.step()
        sched.step()


def test_short_runs_keep_strictly_increasing_knots():
    assert one_cycle_knots(1, 1, 1, 0.1, 1.0) == [(0, 0.1)]
    assert one_cycle_knots(2, 3, 2, 0.1, 1.0) == [(0, 0.1), (5, 1.0)]


def test_a_cycling_momentum_matches_torch_onecycle_every_step():
    # Smith's cyclical momentum: down from 0.95 to 0.85 while the LR rises, back while it falls.
    r, spe = Recipe(momentum=0.95, momentum_at_peak=0.85), 97
    total = r.epochs * spe
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=r.lr_max, momentum=r.momentum)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=r.lr_max, total_steps=total, pct_start=r.peak_epoch / r.epochs,
        div_factor=r.lr_max / r.lr_min, final_div_factor=1.0, anneal_strategy="linear",
        three_phase=False, cycle_momentum=True, base_momentum=r.momentum_at_peak, max_momentum=r.momentum)
    cycle = r.one_cycle(spe)
    for step in range(total):
        assert cycle.lr(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6, abs=1e-12), step
        assert cycle.momentum(step) == pytest.approx(opt.param_groups[0]["momentum"], rel=1e-9), step
        opt.step()
        sched.step()
    assert Recipe().one_cycle(spe).momentum(0) is None  # the seed's: the optimizer keeps its momentum
