"""A folder that another process is writing (a run, a set of seeds, a sweep) is refused, and nothing
in it is read, removed or written; a run lets go of its folder when it ends, also by an error."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cifar_onecycle import Recipe, train, training
from cifar_onecycle.cli import main
from cifar_onecycle.errors import UserError
from cifar_onecycle.files import FolderLock
from cifar_onecycle.run_folder import RunFolder

# What another process does to hold a folder, as a run of this program does (flock on the folder).
HOLD = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()")
# Asks for the lock without waiting: exit code 0 if it got it.
TRY = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
       "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(1)")
TINY = Recipe(epochs=1, peak_epoch=1, batch_size=50, eval_batch_size=50, device="cpu", precision="fp32",
              lr_max=0.01, logit_scale=0.125)
FLAGS = ["--no-download", "--quiet", "--epochs", "1", "--peak-epoch", "1", "--batch-size", "50", "--lr-max", "0.01",
         "--device", "cpu"]


@contextlib.contextmanager
def held_elsewhere(folder: Path) -> Iterator[None]:
    """``folder`` held by another process until the block ends."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        yield
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_held_folder_is_refused_until_let_go_and_the_hold_is_seen_by_other_processes(tmp_path):
    with FolderLock(tmp_path, "out"):
        with pytest.raises(UserError, match="in use by another process") as e:
            FolderLock(tmp_path, "out").__enter__()
        assert e.value.settings == ("out",)
        assert subprocess.run([sys.executable, "-c", TRY, str(tmp_path)]).returncode == 1
    assert subprocess.run([sys.executable, "-c", TRY, str(tmp_path)]).returncode == 0
    with FolderLock(tmp_path, "out"), FolderLock(tmp_path / "not made yet", "out"):  # nothing to hold: no error
        pass


def test_train_over_a_run_in_use_removes_nothing(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("recipe.toml", "metrics.csv", "checkpoint.pt", "report.md"):  # a run there, training
        (out / name).write_text(f"{name} of the run training there")
    before = contents(out)
    with held_elsewhere(out):
        assert main(["train", "--data-dir", str(cifar_dir), "--out", str(out), "--overwrite", *FLAGS]) == 2
        assert "--out " + str(out) + ": in use by another process" in capsys.readouterr().err
        assert contents(out) == before
        assert main(["train", "--resume", str(out), *FLAGS[:2]]) == 2  # its checkpoint is not read
        assert "--resume " + str(out) + ": in use by another process" in capsys.readouterr().err
    assert contents(out) == before


def test_a_set_of_seeds_a_sweep_a_report_and_the_range_test_refuse_a_folder_in_use(cifar_dir, tmp_path, capsys):
    out = tmp_path / "set"
    out.mkdir()
    with held_elsewhere(out):
        assert main(["train", "--seeds", "2", "--data-dir", str(cifar_dir), "--out", str(out), *FLAGS]) == 2
        assert "in use by another process" in capsys.readouterr().err
        assert main(["sweep", "--vary", "lr_max=0.01,0.02", "--data-dir", str(cifar_dir), "--out", str(out),
                     *FLAGS[:8], "--device", "cpu"]) == 2
        assert "in use by another process" in capsys.readouterr().err
        assert main(["report", str(out)]) == 2
        assert "in use by another process" in capsys.readouterr().err
        assert main(["sweep", "--collect", str(out)]) == 2
        assert "--collect " + str(out) + ": in use by another process" in capsys.readouterr().err
        assert main(["lr-find", "--num-iter", "10", "--out", str(out), "--data-dir", str(cifar_dir),
                     "--no-download", "--batch-size", "50", "--device", "cpu"]) == 2
        assert "--out " + str(out) + ": in use by another process" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_resuming_a_set_of_seeds_in_use_is_refused_before_its_files_or_data_are_read(tmp_path, capsys):
    out = tmp_path / "set"
    folder = RunFolder.create(out, set_of_seeds=True)
    folder.write_recipe(TINY)
    folder.write_seeds(0, 2, str(tmp_path / "no data here"))  # loading it would fail with another error
    before = contents(out)
    with held_elsewhere(out):
        assert main(["train", "--resume", str(out), "--quiet"]) == 2
        assert "--resume " + str(out) + ": in use by another process" in capsys.readouterr().err
    assert contents(out) == before


def test_a_run_that_fails_lets_go_of_its_folder(cifar_dir, tmp_path, monkeypatch):
    def range_test_fails(*args, **kwargs):
        raise RuntimeError("the range test broke")

    monkeypatch.setattr(training, "find_lr_bounds", range_test_fails)
    with pytest.raises(RuntimeError, match="range test broke"):
        train(TINY, data_dir=cifar_dir, download=False, out=tmp_path / "run", progress=False, find_lr_max=True)
    with FolderLock(tmp_path / "run", "out") as lock:
        assert lock.fd is not None
