"""--seeds: N runs in sub-folders, their spread in summary.json, and a resume that reuses finished runs."""
import json

import pytest

from cifar_onecycle import Recipe
from cifar_onecycle.cli import main
from cifar_onecycle.errors import UserError
from cifar_onecycle.results import EpochMetrics, spread
from cifar_onecycle.run_folder import RunFolder
from cifar_onecycle.seeds import seeds_summary, train_seeds, write_seeds_results
from cifar_onecycle.sweep_report import plot_seed_curves, seeds_markdown
from test_train import TINY

FLAGS = ["--epochs", "2", "--peak-epoch", "1", "--batch-size", "25", "--eval-batch-size", "16", "--device", "cpu",
         "--precision", "fp32", "--lr-max", "0.02", "--logit-scale", "0.125", "--bn-momentum", "0.5"]


def test_spread_is_sample_statistics():
    s = spread([0.90, 0.92, 0.94])
    assert s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(0.02)
    assert s["sem"] == pytest.approx(0.02 / 3 ** 0.5)
    assert (s["min"], s["max"], s["n"]) == (0.90, 0.94, 3)
    # one value has no spread (not a spread of 0), none not even a mean
    assert spread([0.5]) == {"n": 1, "mean": 0.5, "std": None, "sem": None, "min": 0.5, "max": 0.5}
    assert spread([]) == {"n": 0, "mean": None, "std": None, "sem": None, "min": None, "max": None}


def test_the_last_line_gives_one_seed_no_spread():
    from cifar_onecycle.cli import spread_in_words

    assert spread_in_words(spread([0.90, 0.92])) == "mean 91.00% (std 1.41 points, min 90.00%, max 92.00%)"
    assert spread_in_words(spread([0.9])) == "90.00% (one run)"


def test_the_seeds_page_shows_each_seed_and_their_spread():
    runs = [{"final_val_acc": 0.80, "final_val_acc_tta": 0.82, "final_test_acc": 0.90, "final_test_acc_tta": 0.91,
             "total_seconds": 10.0},
            {"final_val_acc": 0.84, "final_val_acc_tta": 0.85, "final_test_acc": 0.92, "final_test_acc_tta": 0.925,
             "total_seconds": 11.0}]
    page = seeds_markdown(seeds_summary(Recipe(), [3, 4], runs))
    # validation first (what is chosen on); 0.80 and 0.84: mean 0.82, standard deviation 0.04 / sqrt(2) = 0.0283
    assert [line for line in page.splitlines() if line.startswith("| ") and "---" not in line] == [
        "| seed | validation % | validation with flip TTA % | test % | test with flip TTA % |",
        "| 3 | 80.00 | 82.00 | 90.00 | 91.00 |",
        "| 4 | 84.00 | 85.00 | 92.00 | 92.50 |",
        "| mean ± std | 82.00 ± 2.83 | 83.50 ± 2.12 | 91.00 ± 1.41 | 91.75 ± 1.06 |",
        "| standard error of the mean | 2.00 | 1.50 | 1.00 | 0.75 |",
        "| min to max | 80.00 to 84.00 | 82.00 to 85.00 | 90.00 to 92.00 | 91.00 to 92.50 |"]
    assert page.startswith("# The recipe over seeds 3 to 4") and "21.0 s of runs" in page and "](curves.png)" in page
    # without a holdout, the test columns alone; a run without a weight average has no column for it
    one_test_run = [{k: v for k, v in runs[0].items() if "val" not in k}]
    test_only = seeds_markdown(seeds_summary(Recipe().with_epochs(1), [0], one_test_run), curves=False)
    assert "| seed | test % | test with flip TTA % |" in test_only and "curves.png" not in test_only
    assert "| mean ± std | 90.00 | 91.00 |" in test_only  # one seed: a mean, no spread
    assert "| standard error of the mean | - | - |" in test_only and "`): 1 epoch on" in test_only
    assert test_only.startswith("# The recipe over seed 0\n")
    assert "Choose a setting on the validation accuracy" not in test_only


def test_a_new_set_of_seeds_removes_the_earlier_sets_page(tmp_path):
    for name in ("seeds.json", "summary.json", "seeds.md"):
        (tmp_path / name).write_text("{}")
    RunFolder.create(tmp_path, overwrite=True, set_of_seeds=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def held_out_history(rows):
    """A run with a holdout: (train_loss, val_acc) an epoch."""
    return [EpochMetrics(i + 1, 0.01, loss, 0.5, None, None, 1.0, 100.0, val_loss=1.0, val_acc=acc)
            for i, (loss, acc) in enumerate(rows)]


def test_the_seeds_picture_draws_each_seed_and_their_mean():
    histories = {4: held_out_history([(2.0, 0.3), (1.0, 0.5)]), 3: held_out_history([(1.0, 0.5), (0.5, 0.9)])}
    fig = plot_seed_curves(histories)
    loss_axes, accuracy_axes = fig.axes[:2]
    drawn = {line.get_label(): list(line.get_ydata()) for line in accuracy_axes.get_lines()}
    assert drawn == {"seed 3": [pytest.approx(50), pytest.approx(90)], "seed 4": [pytest.approx(30), pytest.approx(50)],
                     "mean of 2": [pytest.approx(40), pytest.approx(70)]}
    assert [list(line.get_ydata()) for line in loss_axes.get_lines()][-1] == [1.5, 0.75]
    assert accuracy_axes.get_title() == "Validation accuracy" and "seeds 3 to 4" in loss_axes.get_title()


def test_the_seeds_results_read_every_metrics_file_before_writing(tmp_path):
    folder = RunFolder(tmp_path / "seeds")
    for seed in (0, 1):
        RunFolder(folder.path / f"seed{seed}").path.mkdir(parents=True)
        RunFolder(folder.path / f"seed{seed}").write_metrics(held_out_history([(1.0, 0.5)]))
    (folder.path / "seed1" / "metrics.csv").write_text("epoch,lr\nnot a number\n")
    with pytest.raises(UserError, match="seed1/metrics.csv: not a run's metrics"):
        write_seeds_results(folder, [0, 1], {"runs": 2})
    assert sorted(p.name for p in folder.path.iterdir()) == ["seed0", "seed1"]  # nothing written
    (folder.path / "seed1" / "metrics.csv").unlink()  # a run without metrics is left out of the picture
    write_seeds_results(folder, [0, 1], {"runs": 2})
    assert json.loads((folder.path / "summary.json").read_text()) == {"runs": 2}
    assert (folder.path / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_seeds_then_resume_reuses_the_finished_one(cifar_dir, tmp_path):
    out = tmp_path / "seeds"
    first = train_seeds(Recipe(**TINY, seed=3), 2, out=out, data_dir=cifar_dir, download=False, progress=False,
                        report=False)
    s = json.loads((out / "summary.json").read_text())
    assert s == first.summary and s["seeds"] == [3, 4] and s["runs"] == 2
    assert (out / "curves.png").stat().st_size > 10_000  # without the runs' own reports
    assert f"| 4 | {100 * s['per_run'][1]['final_test_acc']:.2f} |" in (out / "seeds.md").read_text()
    runs = [json.loads((out / f"seed{k}" / "summary.json").read_text()) for k in (3, 4)]
    assert [r["final_test_acc"] for r in runs] == s["final_test_acc"]["values"]
    assert s["final_test_acc"]["mean"] == pytest.approx(sum(s["final_test_acc"]["values"]) / 2)
    assert s["final_test_acc_tta"]["values"] == [r["final_test_acc_tta"] for r in runs]
    assert s["final_test_acc_without_ema"] is None  # no weight average in this recipe
    assert [(p["seed"], p["folder"]) for p in s["per_run"]] == [(3, "seed3"), (4, "seed4")]
    assert "seed = 4\n" in (out / "seed4" / "recipe.toml").read_text()
    assert "seed = 3\n" in (out / "recipe.toml").read_text()
    assert runs[0]["final_train_acc"] != runs[1]["final_train_acc"]  # the seeds differ
    # A run lost entirely is trained again on resume (the same numbers: same seed); the finished one is read back.
    finished = (out / "seed3" / "model.safetensors").stat().st_mtime_ns
    for f in (out / "seed4").iterdir():
        f.unlink()
    (out / "summary.json").unlink()
    (out / "curves.png").unlink()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert (out / "curves.png").is_file()
    again = json.loads((out / "summary.json").read_text())
    assert (out / "seed3" / "model.safetensors").stat().st_mtime_ns == finished
    assert again["final_test_acc"] == s["final_test_acc"] and again["final_train_acc"] == s["final_train_acc"]


@pytest.mark.parametrize("extra, message", [
    (["--seeds", "0"], "--seeds 0: give at least 1"),
    (["--seeds", "2", "--lr-max", "auto"], "run lr-find once"),
    (["--seeds", str(2**32), "--seed", "1"], "would end at seed 4294967296, beyond the largest, 4294967295"),
])
def test_bad_seeds_flags(cifar_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(cifar_dir), "--no-download", *FLAGS, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_missing_data_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(tmp_path / "nothing"), "--no-download", *FLAGS, "--seeds", "2",
                 "--out", str(out)]) == 2
    assert "cifar-10" in capsys.readouterr().err.lower() and not out.exists()


def test_resume_of_a_seeds_folder_refuses_seeds_and_recipe_changes(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.toml").write_text(Recipe(**TINY).to_toml())
    (out / "seeds.json").write_text('{"first_seed": 0, "seeds": 2, "data_dir": null}')
    assert main(["train", "--resume", str(out), "--seeds", "3"]) == 2
    assert "--seeds do not apply" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--epochs", "3", "--data-dir", str(cifar_dir)]) == 2
    assert "epochs would change from 2 to 3" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["recipe.toml", "seeds.json"]


@pytest.mark.parametrize("seeds_json", [
    {"first_seed": 0, "seeds": 2**40},                  # a list of 2**40 seeds would not fit in memory
    {"first_seed": -1, "seeds": 2},
    {"first_seed": 0, "seeds": 0},
    {"first_seed": 0, "seeds": 2, "data_dir": ["a", "list"]},
])
def test_a_seeds_json_that_is_not_a_range_of_seeds_is_refused(cifar_dir, tmp_path, capsys, seeds_json):
    out = tmp_path / "seeds"
    out.mkdir()
    (out / "recipe.toml").write_text(Recipe(**TINY).to_toml())
    (out / "seeds.json").write_text(json.dumps({"data_dir": str(cifar_dir), **seeds_json}))
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--resume {out}: not a multi-seed run folder (seeds.json: " in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["recipe.toml", "seeds.json"]
