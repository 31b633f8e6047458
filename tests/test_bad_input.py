"""Bad input, as a table: each gets one line on stderr, exit code 2, no traceback, and leaves no
run folder or partial file behind."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_onecycle.cli import main
from conftest import synthetic_batch, write_cifar

QUICK = ["--epochs", "1", "--peak-epoch", "1", "--batch-size", "25", "--device", "cpu", "--precision", "fp32",
         "--lr-max", "0.01", "--quiet"]


def corrupt(name, payload):
    def apply(data: Path):
        path = data / "cifar-10-batches-py" / name
        path.write_bytes(payload(path.read_bytes()) if callable(payload) else payload)
    return apply


def batch_with(**changes):
    raw = {**synthetic_batch(20, 1), **{k.encode(): v for k, v in changes.items()}}
    return corrupt("data_batch_2", pickle.dumps(raw, protocol=4))


CASES = {
    "missing batch file": (lambda d: (d / "cifar-10-batches-py" / "data_batch_4").unlink(), [], "missing data_batch_4"),
    "empty batch file": (corrupt("data_batch_1", b""), [], "data_batch_1: file is empty"),
    "truncated batch file": (corrupt("test_batch", lambda b: b[:1000]), [], "test_batch: truncated or corrupt"),
    "labels outside 0-9": (batch_with(labels=[3] * 19 + [12]), [], "labels must lie in 0..9"),
    "mislabelled count": (batch_with(labels=[1, 2, 3]), [], "20 images but 3 labels"),
    "wrong shape": (batch_with(data=np.zeros((20, 1024), np.uint8)), [], "N x 3072"),
    "wrong dtype": (batch_with(data=np.zeros((20, 3072), np.int16)), [], "uint8"),
    "no data set": (lambda d: None, ["--data-dir", "/nonexistent/cifar"], "CIFAR-10 not found"),
    "peak after last epoch": (None, ["--peak-epoch", "2"], "peak_epoch 2 must lie in"),
    "batch larger than the training set": (None, ["--batch-size", "200", "--train-subset", "100"],
                                           "batch_size 200 is larger than train_subset"),
    "batch larger than the data": (None, ["--batch-size", "200"], "larger than the 100 training images"),
    "LR <= 0": (None, ["--lr-max", "0"], "lr_max must be > 0"),
    "epochs <= 0": (None, ["--epochs", "0"], "epochs must be > 0"),
    "subset larger than the data": (None, ["--train-subset", "1000"], "only 100 training images"),
    "cuda without a GPU": (None, ["--device", "cuda"], "no CUDA device" if not torch.cuda.is_available() else None),
    "fp16 on the CPU": (None, ["--precision", "fp16"], "fp16 needs a CUDA device"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_table(name, tmp_path, capsys):
    damage, extra, message = CASES[name]
    if message is None:
        pytest.skip("a GPU is present")
    data = write_cifar(tmp_path / "data").parent
    if damage:
        damage(data)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--no-download", "--out", str(out), *QUICK, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()                                           # no half-made run folder
    assert not [p for p in data.rglob("*") if p.name.endswith((".part", ".tmp"))]


def test_unknown_recipe_key(tmp_path, capsys):
    bad = tmp_path / "r.toml"
    bad.write_text("epochs = 2\nweight_decy = 5e-4\n")
    assert main(["train", "--recipe", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "unknown key 'weight_decy'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_output_folder_that_holds_another_run(tmp_path, capsys):
    data = write_cifar(tmp_path / "data").parent
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"final_test_acc": 0.9}')
    assert main(["train", "--data-dir", str(data), "--out", str(out), *QUICK]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["summary.json"]
    assert (out / "summary.json").read_text() == '{"final_test_acc": 0.9}'


def test_unwritable_output_folder(tmp_path, capsys):
    data = write_cifar(tmp_path / "data").parent
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--data-dir", str(data), "--out", str(blocker / "run"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "cannot write there" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_divergence_exit_code_3(tmp_path, capsys):
    data = write_cifar(tmp_path / "data").parent
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(data), "--out", str(out), *QUICK, "--lr-max", "1e12",
                 "--logit-scale", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 3 and "diverged" in err and "epoch 1" in err and "LR" in err and len(err.splitlines()) == 1
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


def test_out_of_memory_suggests_a_smaller_batch(tmp_path, capsys, monkeypatch):
    import cifar_onecycle.training as training

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "setup_run", oom)
    data = write_cifar(tmp_path / "data").parent
    assert main(["train", "--data-dir", str(data), "--out", str(tmp_path / "run"), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert "out of device memory" in err and "smaller --batch-size" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command", [["train", *QUICK], ["lr-find", "--device", "cpu"]])
def test_a_data_folder_that_is_a_file(tmp_path, capsys, command):
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("")
    assert main([command[0], "--data-dir", str(not_a_folder), "--out", str(tmp_path / "run"), *command[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--data-dir {not_a_folder}: is a file, not a folder" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not_a_folder.read_text() == ""


def test_a_data_folder_that_cannot_be_read(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    is_dir = Path.is_dir

    def no_permission(path, *args, **kwargs):  # as chmod 000 would, for a user other than root
        if locked in (Path(path), *Path(path).parents):
            raise PermissionError(13, "Permission denied", str(path))
        return is_dir(path)

    monkeypatch.setattr(Path, "is_dir", no_permission)
    monkeypatch.setattr(os.path, "realpath", no_permission)  # Path.resolve stats each part of the path
    assert main(["train", "--data-dir", str(locked), "--out", str(tmp_path / "run"), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--data-dir {locked}: cannot use it (Permission denied)" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import cifar_onecycle.files as files

    real_fsync = os.fsync

    def disk_full_for_checkpoints(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", disk_full_for_checkpoints)
    data = write_cifar(tmp_path / "data").parent
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{out / 'checkpoint.pt'}: cannot write (No space left on device)" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(out.glob(".*.tmp")) and not (out / "checkpoint.pt").exists()


def sets_of_runs(root):
    """A set of seeds' folder, as `train --seeds 2 --seed 3` begins it, and a sweep's."""
    from cifar_onecycle.recipe import Recipe
    from cifar_onecycle.run_folder import RunFolder
    from cifar_onecycle.sweep import SweepFolder
    from cifar_onecycle.sweep_plan import Plan

    seeds = RunFolder.create(root / "seeds", set_of_seeds=True)
    seeds.write_recipe(Recipe())
    seeds.write_seeds(3, 2, None)
    (seeds.path / "seed3").mkdir()
    swept = SweepFolder(root / "sweep")
    swept.open(Plan({"lr_max": [0.1, 0.2]}, 0, 1), Recipe())
    return seeds, swept


@pytest.mark.parametrize("command", [["evaluate", "SET"], ["report", "SET"], ["predict", "SET", "x.png"],
                                     ["train", "--resume", "SET"]])
def test_a_set_of_runs_where_one_run_is_wanted_says_which_to_give(tmp_path, capsys, command):
    seeds, swept = sets_of_runs(tmp_path)
    expected = {"seeds": f"{seeds.path}: a folder of a run per seed (seed3/ and on), not one run's; give one of them, "
                         f"such as {seeds.path / 'seed3'}",
                "sweep": f"{swept.path}: a sweep's folder (a run per point and seed, POINT/seed<k>/, listed in its "
                         f"sweep.csv), not one run's; "
                         + ("to go on with the sweep, run the same cifar-onecycle sweep command again"
                            if command[0] == "train" else "give one of its runs")}
    for name, folder in (("seeds", seeds.path), ("sweep", swept.path)):
        if name == "seeds" and command[0] == "train":
            continue  # a set of seeds is resumed as a set
        before = sorted(p.name for p in folder.rglob("*"))
        assert main([str(folder) if arg == "SET" else arg for arg in command]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"cifar-onecycle: error: {expected[name]}", err
        assert sorted(p.name for p in folder.rglob("*")) == before


def test_collect_given_a_folder_without_a_sweep_names_its_own_flag(tmp_path, capsys):
    assert main(["sweep", "--collect", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"cifar-onecycle: error: --collect {tmp_path}: not a sweep folder (no " \
                                              f"sweep_plan.json)"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_run_is_not_written_over_a_set_of_runs(tmp_path, capsys, overwrite):
    from cifar_onecycle.run_folder import RunFolder

    seeds, swept = sets_of_runs(tmp_path)
    data = write_cifar(tmp_path / "data").parent
    for what, folder in (("a set of seeds", seeds.path), ("a sweep", swept.path)):
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        assert main(["train", "--data-dir", str(data), "--out", str(folder), *QUICK, *overwrite]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"cifar-onecycle: error: --out {folder}: holds {what}, not a run; choose another folder" + (
            " (--overwrite replaces a run's files, not a set's runs)" if overwrite else ""), err
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    RunFolder.create(seeds.path, overwrite=True, set_of_seeds=True)  # a new set of seeds over an old one
    assert not (seeds.path / "seeds.json").exists() and (seeds.path / "seed3").is_dir()


@pytest.mark.parametrize("command", [["evaluate", "RUN"], ["report", "RUN"], ["predict", "RUN", "x.png"],
                                     ["train", "--resume", "RUN"]])
def test_a_run_that_failed_or_has_not_finished_says_what_to_do(tmp_path, capsys, command):
    from cifar_onecycle.recipe import Recipe
    from cifar_onecycle.run_folder import RunFolder

    failed = RunFolder.create(tmp_path / "failed")
    failed.write_recipe(Recipe())
    failed.write_failed("diverged", "training diverged: loss is nan in epoch 3")
    (failed.path / "checkpoint.pt").write_bytes(b"epoch 2's")  # never read: it would diverge again
    stopped = RunFolder.create(tmp_path / "stopped")
    stopped.write_recipe(Recipe())
    (stopped.path / "checkpoint.pt").write_bytes(b"not read")
    resume = command[0] == "train"
    expected = {failed.path: f"{failed.path}: this run failed (diverged: training diverged: loss is nan in epoch 3)"
                             + ("; it would fail again: start a new run" if resume else "; it left no weights"),
                stopped.path: f"{stopped.path}: this run has not finished (a checkpoint, no weights yet); go on "
                              f"with it: cifar-onecycle train --resume {stopped.path}"}
    for folder in (failed.path, stopped.path) if not resume else (failed.path,):  # a stopped run resumes
        assert main([str(folder) if arg == "RUN" else arg for arg in command]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"cifar-onecycle: error: {expected[folder]}", err


@pytest.mark.parametrize("args", [["evaluate", "{long}"], ["report", "{long}"], ["predict", "{long}", "x.png"],
                                  ["train", "--resume", "{long}"], ["sweep", "--collect", "{long}"],
                                  ["compare", "{long}", "{here}"]])
def test_a_folder_name_too_long_for_the_system_is_one_line(tmp_path, capsys, args):
    long = str(tmp_path / ("x" * 300))  # 255 bytes a name on Linux and macOS
    assert main([a.format(long=long, here=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cifar-onecycle: error: {long}") and len(err.splitlines()) == 1, err
    assert err.rstrip().endswith(": File name too long; give a shorter name"), err
