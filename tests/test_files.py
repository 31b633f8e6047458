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
