"""cifar-onecycle compare: runs, sets of seeds and sweep points side by side; the numbers against
hand-computed ones, the picture's lines, and what it refuses."""
import json

import pytest

from cifar_onecycle import Recipe
from cifar_onecycle.cli import main
from cifar_onecycle.compare import compare
from cifar_onecycle.results import EpochMetrics
from cifar_onecycle.run_folder import RunFolder

BASE = Recipe().with_epochs(2)


def write_run(path, recipe, test=None, seconds=60.0, losses=(), val=None, failed=False):
    """A run folder as train leaves it: its recipe, an epoch row a training loss (the accuracy
    1 - loss / 4), and a summary when it finished (``test``; ``val`` with a holdout)."""
    run = RunFolder(path)
    run.path.mkdir(parents=True)
    run.write_recipe(recipe)
    rows = [EpochMetrics(i + 1, 0.1, loss, 0.5, None, None, 1.0, 100.0, val_loss=1.0, val_acc=1 - loss / 4)
            if val is not None else EpochMetrics(i + 1, 0.1, loss, 0.5, 1.0, 1 - loss / 4, 1.0, 100.0)
            for i, loss in enumerate(losses)]
    if rows:
        run.write_metrics(rows)
    if failed:
        run.write_failed("diverged", "training diverged: loss is nan")
    elif test is not None:
        run.write_summary({"final_test_acc": test, "final_test_acc_tta": test + 0.01, "total_seconds": seconds,
                           "steps_per_epoch": 4, **({"final_val_acc": val} if val is not None else {})})


def test_the_table_and_the_curves_are_those_computed_by_hand(tmp_path):
    runs = tmp_path / "runs"
    base = RunFolder(runs / "base")
    base.path.mkdir(parents=True)
    base.write_seeds(0, 4, None)  # a set of seeds (train --seeds)
    for seed, (test, loss) in enumerate([(0.80, 2.0), (0.84, 1.0), (0.82, 3.0)]):
        write_run(base.path / f"seed{seed}", BASE.replace(seed=seed), test, 120, (loss, loss / 2))
    write_run(base.path / "seed3", BASE.replace(seed=3), losses=(0.1,), failed=True)
    smooth = BASE.replace(label_smoothing=0.2)  # a sweep point's folder: seed<k>/ runs alone
    write_run(runs / "smooth" / "seed0", smooth, 0.85, 180, (2.0, 1.0))
    write_run(runs / "smooth" / "seed1", smooth.replace(seed=1), 0.83, 180, (1.0, 0.5))
    write_run(runs / "smooth" / "seed2", smooth.replace(seed=2), losses=(3.0,))  # still training: epoch 1 only
    write_run(runs / "one", smooth.replace(lr_max=0.4, seed=1), 0.90, 30, (1.0, 0.5))
    write_run(runs / "diverged", smooth.replace(lr_max=4.0), losses=(2.0,), failed=True)

    comparison = compare([runs / "base", runs / "smooth", runs / "one", runs / "diverged"])
    assert comparison.folder == str(runs) and comparison.settings == ["lr_max", "label_smoothing"]
    # base: 0.80, 0.84, 0.82: mean 82, standard deviation 2, standard error 2 / sqrt(3) = 1.15.
    # smooth, seeds 0 and 1: 0.85, 0.83; paired with base +5 and -1: mean +2, std 4.24, sem 3.
    # one, seed 1: 0.90 against base's 0.84.
    assert comparison.table() == [
        ["run", "lr_max", "label_smoothing", "seeds", "runs", "test % (sem)", "vs baseline (sem)",
         "test with flip TTA % (sem)", "time a run"],
        ["base", "0.2", "0.0", "0-3", "4 (1 diverged)", "82.00 (1.15)", "baseline", "83.00 (1.15)", "2 min"],
        ["smooth", "0.2", "0.2", "0-2", "3 (1 unfinished)", "84.00 (1.00)", "+2.00 (3.00)", "85.00 (1.00)", "3 min"],
        ["one", "0.4", "0.2", "1", "1", "90.00", "+6.00", "91.00", "30 s"],
        ["diverged", "4.0", "0.2", "0", "1 (1 diverged)", "-", "-", "-", "-"]]
    smooth_stats = comparison.stats["points"][1]
    assert smooth_stats["seeds"] == [0, 1, 2] and smooth_stats["outcomes"] == {"finished": 2, "unfinished": 1}
    assert smooth_stats["final_test_acc"]["paired_difference"]["n"] == 2
    # the curves: base's mean over the 3 seeds that did not diverge; smooth's epoch 1 over its 3 runs,
    # epoch 2 over the 2 that reached it; the diverged run draws nothing
    accuracy = comparison.figure().axes[1]
    drawn = {line.get_label(): [round(y, 6) for y in line.get_ydata()] for line in accuracy.get_lines()}
    assert drawn == {
        "base: lr_max=0.2, label_smoothing=0.0 (baseline) (mean of 3 runs)": [50.0, 75.0],
        "smooth: lr_max=0.2, label_smoothing=0.2 (mean of 3 runs)": [50.0, 81.25],
        "one: lr_max=0.4, label_smoothing=0.2": [75.0, 87.5]}
    assert accuracy.get_title() == "Test accuracy"


def test_seeds_are_named_in_a_cell():
    from cifar_onecycle.compare import seed_list

    assert [seed_list(s) for s in ([0], [0, 1, 2, 3], [0, 2, 5], [1, 3, 5, 7, 9, 11, 13])] == [
        "0", "0-3", "0, 2, 5", "1, 3, 5, 7, 9 and 2 more"]


def test_runs_that_all_hold_images_out_are_compared_on_them(tmp_path, capsys):
    write_run(tmp_path / "a", BASE.replace(holdout=100), 0.80, losses=(1.0,), val=0.70)
    write_run(tmp_path / "b", BASE.replace(holdout=100, flip=False), 0.82, losses=(2.0,), val=0.75)
    write_run(tmp_path / "c", BASE, 0.81, losses=(1.0,))
    both = compare([tmp_path / "a", tmp_path / "b"])
    assert both.stats["selection"] == "final_val_acc"
    assert both.table()[0][4:6] == ["validation % (sem)", "vs baseline (sem)"]
    assert both.table()[2][3:6] == ["1", "75.00", "+5.00"]
    mixed = compare([tmp_path / "a", tmp_path / "c"])  # a run without a holdout: the test set's
    assert mixed.stats["selection"] == "final_test_acc" and mixed.table()[2][4:6] == ["81.00", "+1.00"]
    accuracy = mixed.figure().axes[1]
    assert [line.get_label() for line in accuracy.get_lines()] == [
        "a: holdout=100 (baseline) (validation)", "c: holdout=0 (test)"]
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--picture", str(tmp_path / "ab.png")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"runs in {tmp_path}/"
    assert "difference in validation accuracy from the first run, paired by seed" in out
    assert "tunes it to the test set" not in out and (tmp_path / "ab.png").stat().st_size > 10_000
    assert main(["compare", str(tmp_path / "c"), str(tmp_path / "a"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["baseline"] == "c" and stats["points"][1]["final_test_acc"]["paired_difference"]["mean"] == (
        pytest.approx(-0.01))


@pytest.mark.parametrize("args, message", [
    (["one"], "compare: give 2 to 20 run folders, not 1"),
    (["one", "one/"], "compare: one/ is one again; give each run once"),
    (["one", "sweep"], "sweep: a sweep's folder, whose sweep.md and sweep_curves.png compare its points; give its "
                       "points' folders (sweep/POINT) to compare them with other runs"),
    (["one", "empty"], "empty: no run in it (no recipe.toml, and no seed<k>/ folder with one); give a run's folder "
                       "(train --out), a set of seeds' (train --seeds) or a sweep point's"),
    (["one", "missing"], "missing: not a folder; give a run's folder (train --out)"),
    (["one", "damaged"], "damaged/summary.json: not a finished run's summary"),
    (["one", "one", "--picture", "c.jpg"], "--picture c.jpg: give a .png file's name in a folder that exists"),
])
def test_what_cannot_be_compared_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "one", BASE, 0.8)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep_plan.json").write_text("{}")
    (tmp_path / "empty" / "seedx").mkdir(parents=True)
    write_run(tmp_path / "damaged", BASE, 0.8)
    (tmp_path / "damaged" / "summary.json").write_text('{"final_test_acc": 2}')
    assert main(["compare", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"cifar-onecycle: error: {message}"), captured.err
    assert len(captured.err.splitlines()) == 1
