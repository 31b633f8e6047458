import json
import math

import pytest
import torch
from torch import nn

from cifar_onecycle.cli import main
from cifar_onecycle.errors import UserError
from cifar_onecycle.lr_finder import LRFinderResult, fall_bounds, find_lr, lr_sweep, suggest, write_lr_find

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def blobs(n=256, seed=0):
    """Four Gaussian blobs in 8 dimensions: a tiny, learnable classification problem."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 8, generator=g) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + torch.randn(n, 8, generator=g), y


def tiny_model(bn=True):
    """With BatchNorm for the restore tests; without it the loss blows up at high LRs (BN would
    make the network nearly indifferent to the LR on so easy a problem)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), *([nn.BatchNorm1d(32)] if bn else []), nn.ReLU(), nn.Linear(32, 4))


def batches(bs=32):
    x, y = blobs()
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def test_sweep_end_points_exact():
    exp = lr_sweep("exp", 1e-5, 10.0, 100)
    assert len(exp) == 100 and exp[0] == 1e-5 and exp[-1] == 10.0
    assert exp[50] == pytest.approx(1e-5 * 1e6 ** (50 / 99))
    ratios = [b / a for a, b in zip(exp, exp[1:], strict=False)]
    assert max(ratios) == pytest.approx(min(ratios))
    lin = lr_sweep("linear", 0.02, 0.5, 25)
    assert lin[0] == 0.02 and lin[-1] == 0.5 and lin[12] == pytest.approx(0.26)


def test_loss_falls_then_rises_and_the_sweep_stops_on_divergence():
    r = find_lr(tiny_model(bn=False), batches(), mode="exp", start_lr=1e-4, end_lr=1e4, num_iter=200)
    low = min(range(len(r.smoothed)), key=r.smoothed.__getitem__)
    assert r.smoothed[low] < 0.6 * r.smoothed[0]          # falls
    assert r.stopped is not None and len(r.lrs) < 200     # then rises past 4x the best: stopped early
    assert r.smoothed[-1] > 4 * r.smoothed[low] or "not finite" in r.stopped
    assert r.suggested_lr is not None and r.lrs[10] <= r.suggested_lr <= r.lrs[low]
    assert len(r.accuracies) == len(r.lrs) == len(r.losses)


def test_non_finite_loss_stops_the_sweep():
    calls = []

    def loss_fn(out, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(out, y)
        return loss * float("nan") if len(calls) > 15 else loss

    r = find_lr(tiny_model(), batches(), num_iter=50, loss_fn=loss_fn)
    assert len(r.lrs) == 15 and "not finite" in r.stopped
    assert all(math.isfinite(v) for v in r.losses)


def test_model_and_optimizer_restored_bit_for_bit():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in batches()[:3]:  # give the optimizer momentum buffers and BN some statistics
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_opt = opt.state_dict()
    before_bufs = {k: v["momentum_buffer"].clone() for k, v in before_opt["state"].items()}
    find_lr(model, batches(), opt, num_iter=30, start_lr=1e-3, end_lr=1.0)
    assert not model.training  # mode restored too
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_model[k]) and v.dtype == before_model[k].dtype, k
    after = opt.state_dict()
    assert after["param_groups"] == before_opt["param_groups"]
    for k, buf in before_bufs.items():
        assert torch.equal(after["state"][k]["momentum_buffer"], buf)


def test_restored_even_when_the_sweep_fails():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken():
        yield from batches()[:2]
        raise RuntimeError("data source failed")

    with pytest.raises(RuntimeError):
        find_lr(model, broken, num_iter=20)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_suggestion_ignores_spikes_and_the_ends():
    lrs = [1e-4 * 1.2 ** i for i in range(60)]
    # falls steadily from 2.5 to 1.0 at index 40, then a huge spike at the end
    smoothed = [2.5 - 1.5 * min(i, 40) / 40 for i in range(60)]
    smoothed[41:] = [1.0 + 0.5 * (i - 40) for i in range(41, 60)]
    smoothed[55] = -5.0  # a spike inside the skipped end must never carry the suggestion
    for method in ("valley", "steepest"):
        lr = suggest(lrs, smoothed, method)
        assert lrs[10] <= lr <= lrs[40], method
    assert suggest(lrs[:12], smoothed[:12]) is None  # too short to say


def test_bad_settings_refused():
    for kw, msg in [(dict(start_lr=1.0, end_lr=0.5), "must be above"), (dict(num_iter=5), ">= 10"),
                    (dict(mode="cosine"), "unknown mode"), (dict(start_lr=-1.0), "> 0")]:
        with pytest.raises(UserError, match=msg):
            find_lr(tiny_model(), batches(), **kw)


@pytest.mark.slow
def test_plots_and_json(tmp_path):
    r = find_lr(tiny_model(), batches(), num_iter=40, start_lr=1e-3, end_lr=10.0)
    lin = find_lr(tiny_model(), batches(), mode="linear", num_iter=20, start_lr=0.01, end_lr=0.3)
    ax = r.plot()
    assert ax.get_xscale() == "log" and ax.get_xlabel().startswith("learning rate")
    assert lin.plot().get_xscale() == "linear"
    paths = write_lr_find({"exp": r, "linear": lin}, tmp_path)
    assert [p.name for p in paths] == ["lr_find_exp.png", "lr_find_linear.png", "lr_find.json"]
    for p in paths[:2]:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000
    data = json.loads(paths[2].read_text())
    assert set(data) == {"exp", "linear"}
    assert set(data["exp"]) >= {"lrs", "losses", "smoothed", "suggested_lr_max", "suggested_lr_min", "lr_max_rule",
                                "lr_min_rule"}
    assert data["linear"]["lrs"][0] == 0.01 and data["exp"]["suggested_lr_max"] == r.suggested_lr_max
    assert LRFinderResult(**data["exp"]) == r  # the json holds the whole result, exactly


@pytest.mark.parametrize("argv, msg", [
    (["--start-lr", "1", "--end-lr", "0.1"], "must be above"),
    (["--num-iter", "5"], ">= 10"),
    (["--num-iter", "0"], ">= 10"),
    (["--patience", "0"], "--patience must be >= 1"),
    (["--num-iter", "20", "--sweep-epochs", "2"], "give one"),
    (["--mode", "cosine"], "invalid choice"),
    (["--start-lr", "0"], "--start-lr must be > 0, got 0.0"),   # refused before the data is looked for
    (["--end-lr", "0"], "--end-lr 0.0 must be above --start-lr"),
])
def test_cli_bad_flags(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(["lr-find", *argv, "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path),
                               "--no-download"]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_on_the_recipe_model(cifar_dir, tmp_path, capsys):
    out = tmp_path / "lr"
    assert main(["lr-find", "--data-dir", str(cifar_dir), "--no-download", "--out", str(out), "--num-iter", "12",
                 "--batch-size", "25", "--device", "cpu", "--precision", "fp32", "--mode", "both"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "lr_find.json").read_text())
    for mode in ("exp", "linear"):  # what is printed is what was found, "none" included
        found = {k: "none" if data[mode][f"suggested_{k}"] is None else f"{data[mode][f'suggested_{k}']:.4g}"
                 for k in ("lr_max", "lr_min")}
        assert f"{mode}: LRMAX {found['lr_max']} (plateau), LRMIN {found['lr_min']} (onset)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find_exp.png", "lr_find_linear.png"]
    assert data["exp"]["lrs"][0] == 1e-5 and data["linear"]["lrs"][0] == 1e-4


def stub_bounds(lrs, *args, **kwargs):
    """Known suggestions that say which sweep they came from: (LRMIN, LRMAX, note)."""
    return (3e-5, 0.5, None) if lrs[0] == 1e-5 else (2e-4, 0.03, None)  # exponential, linear


@pytest.mark.parametrize("flags, found_keys", [
    (["--lr-max", "auto", "--lr-min", "1e-6"], {"lr_max"}),
    (["--lr-max", "auto", "--lr-min", "auto"], {"lr_max", "lr_min"}),
])
@pytest.mark.slow
def test_train_lr_auto_reads_lrmax_off_the_linear_sweep_and_lrmin_off_the_exponential(
        flags, found_keys, cifar_dir, tmp_path, monkeypatch):
    import cifar_onecycle.lr_finder as lr_finder

    # The tiny synthetic set gives a short, noisy curve; the test is about the wiring, so the rule
    # is stubbed with known values.
    monkeypatch.setattr(lr_finder, "suggest_bounds", stub_bounds)
    out = tmp_path / "run"
    assert main(["train", *flags, "--data-dir", str(cifar_dir), "--no-download", "--out", str(out),
                 "--epochs", "1", "--peak-epoch", "1", "--batch-size", "5", "--device", "cpu",
                 "--precision", "fp32", "--quiet", "--no-report"]) == 0
    sweeps = json.loads((out / "lr_find.json").read_text())
    assert sorted(sweeps) == (["exp", "linear"] if "lr_min" in found_keys else ["linear"])
    assert sweeps["linear"]["suggested_lr_max"] == 0.03 and sweeps["linear"]["lr_max_rule"] == "plateau"
    summary = json.loads((out / "summary.json").read_text())
    found = summary["lr_found"]
    assert {k for k in ("lr_max", "lr_min") if k in found} == found_keys
    assert found["lr_max_sweep"] == "linear" and summary["lr_max"] == 0.03
    if "lr_min" in found_keys:
        assert found["lr_min_sweep"] == "exp" and found["lr_min_rule"] == "onset"
    assert summary["lr_min"] == (3e-5 if "lr_min" in found_keys else 1e-6)
    recipe_text = (out / "recipe.toml").read_text()
    assert "lr_max = 0.03\n" in recipe_text and f"lr_min = {summary['lr_min']!r}\n" in recipe_text


@pytest.mark.slow
def test_lr_min_auto_replaces_a_lr_min_derived_from_lr_max(cifar_dir, tmp_path, monkeypatch):
    import cifar_onecycle.lr_finder as lr_finder

    monkeypatch.setattr(lr_finder, "suggest_bounds", stub_bounds)
    out = tmp_path / "run"
    assert main(["train", "--recipe", "dawnbench", "--lr-min", "auto", "--data-dir", str(cifar_dir), "--no-download",
                 "--out", str(out), "--epochs", "1", "--peak-epoch", "1", "--batch-size", "5", "--device", "cpu",
                 "--precision", "fp32", "--quiet", "--no-report"]) == 0
    text = (out / "recipe.toml").read_text()
    assert "lr_min = 3e-05\n" in text and "lr_min_div = 0.0\n" in text and "lr_max = 0.4\n" in text


def linear_sweep(n=300):
    return [1e-3 + (1.0 - 1e-3) * i / (n - 1) for i in range(n)]


def knee_curve(lrs, start=0.1, end=0.4, top=2.3, bottom=0.5):
    """Flat at ``top`` up to LR ``start``, straight down to ``bottom`` at ``end``, flat after."""
    return [top if lr < start else bottom if lr > end else top - (top - bottom) * (lr - start) / (end - start)
            for lr in lrs]


def test_plateau_rule_reads_the_two_ends_of_the_fall():
    lrs = linear_sweep()
    lr_min, lr_max, note = fall_bounds(lrs, knee_curve(lrs))
    # 5% of the fall done at 0.1 + 0.05 x 0.3; within 5% of the bottom at 0.4 - 0.05 x 0.3
    assert lr_min == pytest.approx(0.115, abs=0.01) and lr_max == pytest.approx(0.385, abs=0.02)
    assert note is None


def test_plateau_rule_through_noise():
    lrs = linear_sweep()
    g = torch.Generator().manual_seed(0)
    noisy = [v + 0.15 * float(e) for v, e in zip(knee_curve(lrs), torch.randn(len(lrs), generator=g), strict=False)]
    lr_min, lr_max, _ = fall_bounds(lrs, noisy)
    assert lr_min == pytest.approx(0.115, abs=0.05) and lr_max == pytest.approx(0.385, abs=0.05)
    # Noise as a real sweep has it against its fall: 0.05 a point here, averaged over the 15-point
    # window, is 0.7% of the 1.8 fall (a 582-iteration linear sweep, window 29, batch-loss noise
    # about 0.1: 1%). Over 50 seeds the rule read 0.105..0.125 and 0.385..0.405; without the
    # smoothing it reads LRMAX up to 0.48, with a 10% band LRMIN from 0.125 and LRMAX from 0.372.
    for seed in range(20):
        e = torch.randn(len(lrs), generator=torch.Generator().manual_seed(seed))
        lr_min, lr_max, _ = fall_bounds(lrs, [v + 0.05 * float(x) for v, x in zip(knee_curve(lrs), e, strict=True)])
        assert lr_min == pytest.approx(0.115, abs=0.015) and 0.38 <= lr_max <= 0.41, (seed, lr_min, lr_max)


def test_plateau_rule_ignores_the_blow_up_after_the_plateau():
    lrs = linear_sweep()
    curve = [v + (max(0.0, lr - 0.7) * 40) ** 2 for v, lr in zip(knee_curve(lrs), lrs, strict=False)]
    lr_min, lr_max, _ = fall_bounds(lrs, curve)
    assert lr_min == pytest.approx(0.115, abs=0.01) and lr_max == pytest.approx(0.385, abs=0.02)


def test_a_curve_that_never_blows_up_says_so():
    lrs = linear_sweep()
    falling = [2.3 - 1.8 * lr for lr in lrs]  # still falling at the last LR
    lr_min, lr_max, note = fall_bounds(lrs, falling)
    assert lr_max > 0.9 and lr_min < 0.1 and "still falling" in note


def exp_sweep(n=97):
    """The default exponential sweep's LRs: 1e-5 to 10 over one epoch of 97 steps."""
    return [1e-5 * 1e6 ** (i / (n - 1)) for i in range(n)]


def log_knee(lrs, start=1e-3, end=1e-1, top=2.3, bottom=0.8):
    """Flat at ``top`` up to ``start``, straight down in log LR to ``bottom`` at ``end``, blowing up past 1."""
    a, b = math.log10(start), math.log10(end)
    return [(top if lr < start else bottom if lr > end else top - (top - bottom) * (math.log10(lr) - a) / (b - a))
            + (max(0.0, math.log10(lr)) * 6) ** 2 for lr in lrs]


def test_the_onset_on_an_exponential_sweep_is_where_the_fall_begins():
    lrs = exp_sweep()
    lr_min, _, _ = fall_bounds(lrs, log_knee(lrs))
    # 5% of the fall is done a twentieth of the way from 1e-3 to 1e-1 in log LR: 10**-2.9, 1.26e-3
    assert 10 ** -2.95 <= lr_min <= 10 ** -2.8


def test_the_onset_is_not_a_dip_of_noise():
    # A batch loss's noise (0.05 here) dips the half-window average at the sweep's start below the
    # onset threshold now and then; the onset is where the curve stays below it.
    lrs = exp_sweep()
    for seed in range(20):
        noise = torch.randn(len(lrs), generator=torch.Generator().manual_seed(seed))
        lr_min, _, _ = fall_bounds(lrs, [v + 0.05 * float(e) for v, e in zip(log_knee(lrs), noise, strict=True)])
        assert 10 ** -3.2 <= lr_min <= 10 ** -2.6, f"seed {seed}: LRMIN {lr_min:.3g}"


@pytest.mark.parametrize("curve", [
    lambda lrs: [2.3 + 5 * lr for lr in lrs],                                              # blows up at once
    # noise alone (a seed whose averaged curve happens to dip 0.06 below its start)
    lambda lrs: [2.3 + 0.1 * float(e) for e in torch.randn(len(lrs), generator=torch.Generator().manual_seed(3))],
])
def test_no_suggestion_without_a_fall(curve):
    lrs = linear_sweep()
    assert fall_bounds(lrs, curve(lrs))[:2] == (None, None)
    assert "does not fall" in fall_bounds(lrs, curve(lrs))[2]


def test_a_spike_the_network_recovers_from_does_not_end_the_sweep():
    calls = []

    def spiky(out, y):
        calls.append(1)
        loss = nn.functional.cross_entropy(out, y)
        return loss * 30 if 12 <= len(calls) <= 13 else loss  # two iterations, then back to normal

    r = find_lr(tiny_model(), batches(), mode="linear", start_lr=1e-3, end_lr=0.05, num_iter=100, loss_fn=spiky)
    assert r.stopped is None and len(r.lrs) == 100
    calls.clear()
    r = find_lr(tiny_model(), batches(), mode="linear", start_lr=1e-3, end_lr=0.05, num_iter=100, loss_fn=spiky,
                patience=1)
    assert r.stopped is not None and len(r.lrs) == 13


def test_the_sweep_steps_through_the_loss_scaler_and_puts_it_back():
    # fp16 needs loss scaling; the range test takes the training loop's scaler and step
    class CountingScaler(torch.amp.GradScaler):
        scaled = 0

        def scale(self, outputs):
            self.scaled += 1
            return super().scale(outputs)

    scaler = CountingScaler("cpu", init_scale=1024.0, growth_interval=1)  # grows after every good step
    result = find_lr(tiny_model(), batches(), mode="exp", num_iter=12, diverge=1e9, scaler=scaler)
    assert len(result.lrs) == 12 and scaler.scaled == 12
    assert scaler.get_scale() == 1024.0  # its state is restored with the model's and the optimizer's


def test_an_unwritable_out_is_refused_before_the_sweep(cifar_dir, tmp_path, capsys, monkeypatch):
    import cifar_onecycle.lr_finder as lr_finder

    monkeypatch.setattr(lr_finder, "lr_range_test", lambda *a, **k: pytest.fail("swept before checking --out"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out, message in ((blocker, "exists and is not a folder"), (blocker / "sub", "cannot write there")):
        assert main(["lr-find", "--data-dir", str(cifar_dir), "--no-download", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--out {out}: {message}" in err and len(err.splitlines()) == 1, err


def test_a_runs_own_range_test_is_not_replaced(cifar_dir, tmp_path, capsys, monkeypatch):
    """A run that found its LRs with auto keeps the range test its summary describes: lr-find refuses
    to write over it, before the data or the sweep; beside a run alone, or over a range test alone, it
    may write."""
    import cifar_onecycle.lr_finder as lr_finder
    from cifar_onecycle.run_folder import RunFolder

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"lr_found": {"lr_max": 0.5}}')
    (run / "lr_find.json").write_text("the run's own")
    monkeypatch.setattr(lr_finder, "lr_range_test", lambda *a, **k: pytest.fail("swept over a run's range test"))
    assert main(["lr-find", "--data-dir", str(tmp_path / "no-data"), "--no-download", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {run}: holds a run (summary.json) and its range test (lr_find.json)" in err, err
    assert len(err.splitlines()) == 1 and (run / "lr_find.json").read_text() == "the run's own"

    (run / "lr_find.json").unlink()  # a run alone: its range test goes beside it
    RunFolder(run).check_range_test_replaceable()
    alone = tmp_path / "alone"  # a range test alone: done again
    alone.mkdir()
    (alone / "lr_find_exp.png").write_bytes(b"")
    RunFolder(alone).check_range_test_replaceable()
    (alone / "recipe.toml").write_text("")  # now beside a run's file: refused, by the graph alone too
    with pytest.raises(UserError, match="holds a run \\(recipe.toml\\) and its range test \\(lr_find_exp.png\\)"):
        RunFolder(alone).check_range_test_replaceable()
