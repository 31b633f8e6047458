"""Atomic writes: the run folder's files survive a kill and a power cut, and a failed write leaves nothing."""
import os

import pytest

from cifar_onecycle.checkpoint import atomic_write


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
    with pytest.raises(OSError):
        atomic_write(tmp_path / "a.txt", "hello")
    assert os.listdir(tmp_path) == []
    assert set(os.listdir("/proc/self/fd")) <= before  # the temporary file's descriptor is closed


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
