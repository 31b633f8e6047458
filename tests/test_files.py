"""Atomic writes: the run folder's files survive a kill and a power cut, and a failed write leaves nothing.
Reads: no file of a run decides how much memory reading it takes."""
import io
import os
import zipfile

import pytest
import torch

from cifar_onecycle.cli import main
from cifar_onecycle.errors import WriteError
from cifar_onecycle.files import MAX_CHECKPOINT_BYTES, MAX_TEXT_BYTES, MAX_WEIGHTS_BYTES, atomic_write


def test_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic_write(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert ".a.txt." in synced[0] and synced[-1] == str(tmp_path)  # the data, then the rename


def test_a_failed_write_closes_and_removes_its_temporary_file(tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(WriteError, match="a.txt: cannot write \\(Operation not permitted\\)"):
        atomic_write(tmp_path / "a.txt", "hello")
    assert os.listdir(tmp_path) == []
    assert set(os.listdir("/proc/self/fd")) <= before  # the temporary file's descriptor is closed


def test_a_run_writes_its_files_without_the_calls_windows_lacks(cifar_dir, tmp_path, monkeypatch):
    # Windows (Python before 3.13) has no os.fchmod and no fcntl, cannot open a folder, and opens a
    # descriptor in text mode without O_BINARY: a run there must still write every file and read
    # them as bytes. Imitated here, on Linux: no Windows machine runs this suite, so this is the
    # check there is, not a claim that Windows was tried.
    import cifar_onecycle.files as files
    from cifar_onecycle import Recipe, train
    from cifar_onecycle.run_folder import RunFolder

    real_open, binary, reads = os.open, 0x8000, {}  # Windows' O_BINARY; without it a read is in text mode

    def no_folders(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        if not flags & (os.O_WRONLY | os.O_RDWR):
            reads[os.path.basename(path)] = bool(flags & binary)
        return real_open(path, flags & ~binary, *args, **kwargs)

    monkeypatch.delattr(os, "fchmod")
    monkeypatch.setattr(os, "open", no_folders)
    monkeypatch.setattr(os, "O_BINARY", binary, raising=False)
    monkeypatch.setattr(files, "fcntl", None)
    recipe = Recipe(epochs=2, peak_epoch=1, batch_size=10, train_subset=40, eval_batch_size=16, device="cpu",
                    precision="fp32", lr_max=0.02, logit_scale=0.125)
    result = train(recipe, data_dir=cifar_dir, download=False, out=tmp_path / "run", progress=False,
                   keep_checkpoint=True)
    run = RunFolder(tmp_path / "run")
    assert run.read_summary()["final_test_acc"] == result.summary["final_test_acc"]
    assert {"recipe.toml", "metrics.csv", "model.safetensors", "checkpoint.pt", "report.md", "curves.png"} <= set(
        os.listdir(tmp_path / "run"))
    assert not [name for name in os.listdir(tmp_path / "run") if name.endswith(".tmp")]
    # and read back, every file in binary mode: the data's batches, the weights, the recipe, the summary
    from cifar_onecycle.checkpoint import load_weights

    assert load_weights(tmp_path / "run")[1] == result.recipe
    assert {"data_batch_1", "test_batch", "model.safetensors"} <= reads.keys()
    assert [name for name, in_binary in reads.items() if not in_binary] == []


def test_metrics_csv_is_read_back_by_column_name():
    from cifar_onecycle.results import EpochMetrics, metrics_csv, parse_metrics_csv

    history = [EpochMetrics(1, 0.1, 2.0, 0.3, 1.9, 0.35, 12.5, 40.0),
               EpochMetrics(2, 0.2, 1.5, 0.5, 1.4, 0.55, 12.0, 41.5)]
    text = metrics_csv(history)
    assert parse_metrics_csv(text) == history
    header, *rows = [line.split(",") for line in text.splitlines()]
    order = list(reversed(range(len(header))))  # the same table with its columns in another order
    shuffled = "\n".join(",".join(row[i] for i in order) for row in [header, *rows]) + "\n"
    assert parse_metrics_csv(shuffled) == history
    with_tta = [EpochMetrics(1, 0.1, 2.0, 0.3, 1.9, 0.35, 12.5, 40.0, 0.375)]
    assert parse_metrics_csv(metrics_csv(with_tta)) == with_tta
    with pytest.raises(ValueError, match="no test_acc"):
        parse_metrics_csv(text.replace("test_acc,", "test_accuracy,", 1))


def sparse(path, size):
    """A file of ``size`` bytes that takes no disk space."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize("name, size, argv", [
    ("model.safetensors", MAX_WEIGHTS_BYTES + 1, ["evaluate", "{run}"]),
    ("model.safetensors", MAX_WEIGHTS_BYTES + 1, ["predict", "{run}", "x.png"]),
    ("checkpoint.pt", MAX_CHECKPOINT_BYTES + 1, ["train", "--resume", "{run}"]),
    ("seeds.json", MAX_TEXT_BYTES + 1, ["train", "--resume", "{run}"]),
    ("recipe.toml", MAX_TEXT_BYTES + 1, ["train", "--recipe", "{run}/recipe.toml", "--out", "{run}/new"]),
])
def test_a_file_above_its_ceiling_is_refused_before_it_is_read(tmp_path, capsys, reads_forbidden, name, size, argv):
    from cifar_onecycle import Recipe

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(Recipe().to_toml())  # a run's own recipe is read first on resume
    sparse(run / name, size)
    assert main([arg.format(run=run) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{run / name}: {size:,} bytes, larger than any" in err and len(err.splitlines()) == 1, err


def test_metrics_and_summary_above_their_ceiling_are_refused(tmp_path, reads_forbidden):
    from cifar_onecycle.errors import UserError
    from cifar_onecycle.run_folder import RunFolder

    run = RunFolder(tmp_path)
    for name, read in (("metrics.csv", run.read_metrics), ("summary.json", run.read_summary)):
        sparse(tmp_path / name, MAX_TEXT_BYTES + 1)
        with pytest.raises(UserError, match=f"{name}: {MAX_TEXT_BYTES + 1:,} bytes, larger than any"):
            read()


def test_a_checkpoint_with_compressed_members_is_refused(tmp_path):
    from cifar_onecycle.checkpoint import load_checkpoint
    from cifar_onecycle.errors import UserError

    buf = io.BytesIO()
    torch.save({"format": "cifar-onecycle-checkpoint/1", "zeros": torch.zeros(1 << 20)}, buf)
    squeezed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as stored, \
            zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as deflated:
        for member in stored.infolist():
            deflated.writestr(member.filename, stored.read(member))
    assert len(squeezed.getvalue()) < len(buf.getvalue()) // 50  # 4 MB of zeros in a few kB: a bomb's shape
    (tmp_path / "checkpoint.pt").write_bytes(squeezed.getvalue())
    with pytest.raises(UserError, match="compressed or oversized members"):
        load_checkpoint(tmp_path / "checkpoint.pt")
