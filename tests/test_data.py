import hashlib
import io
import os
import pickle
import pickletools
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cifar_onecycle.data import (
    CIFAR10,
    DatasetError,
    download_archive,
    download_bar,
    ensure_cifar10,
    load_cifar10,
    read_batch,
    safe_load,
)
from conftest import Payload, py2_pickle, synthetic_batch, write_cifar


def test_loads_the_official_layout(cifar_dir):
    d = load_cifar10(cifar_dir, download=False)
    assert d.train_images.shape == (100, 3, 32, 32) and d.train_images.dtype.is_floating_point is False
    assert d.test_images.shape == (30, 3, 32, 32)
    assert d.train_labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    raw = synthetic_batch(20, 1)
    assert np.array_equal(d.train_images[:20].numpy().reshape(20, 3072), raw[b"data"])


def test_the_batches_own_folder_given_for_its_parent_is_read(cifar_dir):
    # a common slip: --data-dir DIR/cifar-10-batches-py where DIR was meant
    assert ensure_cifar10(cifar_dir / "cifar-10-batches-py", download=False) == cifar_dir / "cifar-10-batches-py"
    d = load_cifar10(cifar_dir / "cifar-10-batches-py", download=False)
    assert np.array_equal(d.train_images.numpy(), load_cifar10(cifar_dir, download=False).train_images.numpy())
    (cifar_dir / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetError, match="cifar-10-batches-py: missing test_batch"):
        ensure_cifar10(cifar_dir / "cifar-10-batches-py", download=False)


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = write_cifar(tmp_path / "data")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload(marker), b"labels": [0]}, protocol=4))
    with pytest.raises(DatasetError, match=r"data_batch_3: refused .*open is not allowed"):
        load_cifar10(tmp_path / "data", download=False)
    assert not marker.exists()
    # the same payload at the top level, and through os.system
    (folder / "test_batch").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DatasetError):
        safe_load(folder / "test_batch")
    (folder / "test_batch").write_bytes(b"cposix\nsystem\n(Vtouch " + str(marker).encode() + b"\ntR.")
    with pytest.raises(DatasetError, match="posix.system is not allowed"):
        safe_load(folder / "test_batch")
    assert not marker.exists()


def test_object_dtype_is_refused(tmp_path):
    p = tmp_path / "b"
    p.write_bytes(pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": [0]}, protocol=4))
    with pytest.raises(DatasetError, match="dtype 'O' is not allowed|not allowed"):
        safe_load(p)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: b"", "is empty"),
    (lambda b: b"not a pickle at all", "corrupt"),
])
def test_corrupt_files(tmp_path, mutate, message):
    p = tmp_path / "data_batch_1"
    p.write_bytes(mutate(pickle.dumps(synthetic_batch(20, 1), protocol=4)))
    with pytest.raises(DatasetError, match=message) as e:
        read_batch(p)
    assert "data_batch_1" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({b"data": np.zeros((4, 3071), np.uint8)}, "N x 3072"),
    ({b"data": np.zeros((4, 3072), np.float32)}, "uint8"),
    ({b"labels": [0, 1, 2, 10] * 5}, r"0\.\.9"),
    ({b"labels": [0, 1, -1, 2] * 5}, r"0\.\.9"),
    ({b"labels": [0, 1]}, "20 images but 2 labels"),
    ({b"labels": ["a"] * 20}, "list of integers"),
])
def test_bad_batches(tmp_path, change, message):
    batch = {**synthetic_batch(20, 1), **change}
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DatasetError, match=message):
        read_batch(p)


def test_missing_data_without_download(tmp_path):
    with pytest.raises(DatasetError, match="CIFAR-10 not found.*cifar-10-batches-py"):
        ensure_cifar10(tmp_path, download=False)
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetError, match="missing data_batch_1"):
        ensure_cifar10(tmp_path, download=False)


def make_archive(src_root: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src_root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return dest


def test_extracts_an_archive(tmp_path):
    write_cifar(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    make_archive(tmp_path / "src", data / "cifar-10-python.tar.gz")
    d = load_cifar10(data, download=False)
    assert len(d.train_images) == 100
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_unsafe_archive_member_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DatasetError, match="unsafe member"):
        ensure_cifar10(data, download=False)
    assert not (tmp_path / "escaped").exists() and not (data / "cifar-10-batches-py").exists()


def test_the_download_shows_a_progress_bar(tmp_path, capsys):
    write_cifar(tmp_path / "src")
    archive = make_archive(tmp_path / "src", tmp_path / "served.tar.gz")
    download_archive(tmp_path / "data" / "cifar-10-python.tar.gz", replace(CIFAR10, url=archive.as_uri(), md5=""),
                     download_bar())
    err = capsys.readouterr().err
    assert "download CIFAR-10" in err and "B/s" in err, err  # tqdm's bar of bytes, with its rate


def test_download_checks_md5_and_leaves_nothing_half_written(tmp_path):
    write_cifar(tmp_path / "src")
    archive = make_archive(tmp_path / "src", tmp_path / "served.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "cifar-10-python.tar.gz"
    seen = []
    served = replace(CIFAR10, url=archive.as_uri(), md5=md5)
    download_archive(dest, served, lambda d, t: seen.append(d))
    assert dest.read_bytes() == archive.read_bytes() and seen[-1] == archive.stat().st_size
    dest.unlink()
    with pytest.raises(DatasetError, match="md5"):
        download_archive(dest, replace(served, md5="0" * 32))
    with pytest.raises(DatasetError, match="cannot download"):
        download_archive(dest, replace(served, url=(tmp_path / "nope.tar.gz").as_uri()))
    assert os.listdir(tmp_path / "data") == []


def test_a_failed_download_leaves_no_folder_it_made(tmp_path):
    unreachable = replace(CIFAR10, url=(tmp_path / "nope.tar.gz").as_uri())
    with pytest.raises(DatasetError, match="cannot download"):
        download_archive(tmp_path / "new" / "data" / "cifar-10-python.tar.gz", unreachable)
    assert os.listdir(tmp_path) == []  # a mistyped --data-dir or no network: nothing made
    (tmp_path / "given").mkdir()  # a folder that was there stays
    with pytest.raises(DatasetError, match="cannot download"):
        download_archive(tmp_path / "given" / "cifar-10-python.tar.gz", unreachable)
    assert os.listdir(tmp_path) == ["given"] and os.listdir(tmp_path / "given") == []


@pytest.mark.slow
def test_proxy_data_loads_with_the_restricted_unpickler(proxy_dir):
    d = load_cifar10(proxy_dir, download=False)
    assert d.train_images.shape == (50_000, 3, 32, 32) and d.test_images.shape == (5_000, 3, 32, 32)
    assert np.bincount(d.test_labels.numpy()).tolist() == [500] * 10
    assert np.bincount(d.train_labels.numpy()).tolist() == [5000] * 10


class CalledNdarray:
    """Pickles as a direct call of numpy.ndarray: a zero-stride view of ten million phantom images
    over one byte (about 200 bytes of file)."""

    def __reduce__(self):
        return (np.ndarray, ((10_000_000, 3072), "u1", b"\x00", 0, (0, 0)))


class ShortArray:
    """Pickles as numpy's own array reconstruction whose state claims more rows than its bytes fill."""

    def __reduce__(self):
        reconstruct = np.zeros(1).__reduce__()[0]  # numpy's own _reconstruct
        return (reconstruct, (np.ndarray, (0,), b"b"), (1, (10, 3072), np.dtype("u1"), False, b"\x00" * 100))


def refused(path):
    """Load ``path`` in a child process (a crash must fail the test, not end the test run): its
    exit code and its one line of output."""
    import subprocess
    import sys

    code = ("import sys\nfrom pathlib import Path\nfrom cifar_onecycle.data import DatasetError, safe_load\n"
            "try:\n    safe_load(Path(sys.argv[1]))\nexcept DatasetError as e:\n    print(e)\n    sys.exit(2)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout.strip()


@pytest.mark.parametrize("payload, message", [
    (lambda: pickle.dumps({b"data": CalledNdarray(), b"labels": [0]}, protocol=4), "numpy.ndarray may not be called"),
    (lambda: pickle.dumps({b"data": ShortArray(), b"labels": [0]}, protocol=4), "does not match its 100 bytes"),
    # a dict key nested a million tuples deep, without a single MARK
    (lambda: b"\x80\x04}" + b")" + b"\x85" * 1_000_000 + b"K\x01s.", "nested more than 32 deep"),
    # a memo index that would make the unpickler allocate a memo of two billion entries
    (lambda: b"\x80\x04Nr\xff\xff\xff\x7f.", "memo index 2147483647"),
    (lambda: b"\x80\x04h\x05.", "memo index 5 read before it was written"),
])
@pytest.mark.slow
def test_crafted_streams_are_refused_before_anything_is_built(tmp_path, payload, message):
    p = tmp_path / "data_batch_1"
    p.write_bytes(payload())
    code, line = refused(p)
    assert code == 2 and message in line and "data_batch_1" in line and "\n" not in line, (code, line)


def test_a_batch_file_too_large_is_refused_before_it_is_read(tmp_path, reads_forbidden):
    import cifar_onecycle.data as data

    p = tmp_path / "data_batch_1"
    with open(p, "wb") as f:
        f.truncate(data.MAX_BATCH_BYTES + 1)  # sparse: no 64 MB written
    with pytest.raises(DatasetError, match="larger than any CIFAR-10 batch file"):
        safe_load(p)


def test_arrays_from_the_file_own_exactly_its_bytes(tmp_path):
    p = tmp_path / "b"
    labels = np.arange(20, dtype=np.int64) % 10
    p.write_bytes(pickle.dumps({b"data": np.arange(20 * 3072, dtype=np.uint64).astype(np.uint8).reshape(20, 3072),
                                b"labels": labels}, protocol=4))
    images, got = read_batch(p)
    root = images
    while root.base is not None:
        root = root.base
    # a fresh array holding exactly the file's bytes, not a view of the file's buffer
    assert isinstance(root, np.ndarray) and root.flags.owndata and root.nbytes == 20 * 3072
    assert got.tolist() == labels.tolist()


def test_archives_with_too_many_members_or_bytes_are_refused(tmp_path, monkeypatch):
    import cifar_onecycle.data as data

    write_cifar(tmp_path / "src")
    big = tmp_path / "many"
    big.mkdir()
    with tarfile.open(big / "cifar-10-python.tar.gz", "w:gz") as tf:
        for i in range(17):
            info = tarfile.TarInfo(f"cifar-10-batches-py/extra_{i}")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DatasetError, match="more than 16 members"):
        ensure_cifar10(big, download=False)
    assert not (big / "cifar-10-batches-py").exists()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_archive(tmp_path / "src", data_dir / "cifar-10-python.tar.gz")
    monkeypatch.setattr(data, "MAX_ARCHIVE_BYTES", 10_000)  # the synthetic batches are larger
    with pytest.raises(DatasetError, match="unpacks to more than 10,000 bytes"):
        ensure_cifar10(data_dir, download=False)
    assert not (data_dir / "cifar-10-batches-py").exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "absolute", "dotdot"])
def test_archive_members_that_could_write_outside_are_refused(tmp_path, kind):
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar-10-python.tar.gz", "w:gz") as tf:
        name = {"absolute": "/cifar-10-batches-py/evil", "dotdot": "cifar-10-batches-py/../../evil"}.get(
            kind, "cifar-10-batches-py/data_batch_1")
        info = tarfile.TarInfo(name)
        if kind in ("symlink", "hardlink"):
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = str(tmp_path / "outside")
            tf.addfile(info)
        else:
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DatasetError, match="unsafe member|no 'cifar-10-batches-py/' inside"):
        ensure_cifar10(data, download=False)
    assert not (data / "cifar-10-batches-py").exists() and not (tmp_path / "evil").exists()
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]  # no temporary folder left


def test_a_truncated_archive_is_refused_and_leaves_nothing(tmp_path):
    write_cifar(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    whole = make_archive(tmp_path / "src", tmp_path / "whole.tar.gz").read_bytes()
    (data / "cifar-10-python.tar.gz").write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DatasetError, match="cannot extract"):
        ensure_cifar10(data, download=False)
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]


def test_the_official_python_2_format_loads(tmp_path):
    batch = synthetic_batch(20, 4)
    raw = py2_pickle(batch)
    assert raw[:2] == b"\x80\x02" and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert max(op.proto for op, _, _ in pickletools.genops(raw)) <= 2  # nothing Python 2 could not write
    (tmp_path / "data_batch_1").write_bytes(raw)
    images, labels = read_batch(tmp_path / "data_batch_1")
    assert np.array_equal(images.reshape(20, 3072), batch[b"data"]) and labels.tolist() == batch[b"labels"]
