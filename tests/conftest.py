"""Shared fixtures: tiny CIFAR-10 folders in the official pickle format, the proxy data, and the
command-line flags of a small recipe."""
from __future__ import annotations

import dataclasses
import fcntl
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CIFAR_ONECYCLE_SHARED", ROOT.parent / "shared"))

# The commands the tests start react to SIGINT as a command started from a terminal does. A suite
# run as a background job of a non-interactive shell (`cmd &` in a script) starts with SIGINT
# ignored, Python leaves it so, and every process it starts inherits that: a run sent SIGINT while
# loading its data then trained to its end (exit 0, not 130). Caught here, it is back to its default
# in each process this one starts.
signal.signal(signal.SIGINT, signal.default_int_handler)


def recipe_flags(recipe) -> list[str]:
    """The flags that turn the seed's recipe into ``recipe`` on the command line: one small recipe
    serves the Python API's tests and the CLI's."""
    from cifar_onecycle import Recipe

    flags: list[str] = []
    for field in dataclasses.fields(Recipe):
        value = getattr(recipe, field.name)
        if value == field.default:
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


class Payload:
    """A hostile pickle: unpickling it runs ``open(path, 'w')``, so the file appearing means code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def synthetic_batch(n: int, seed: int) -> dict:
    """A learnable stand-in: each class is a distinct colour plus noise, labels cycle 0..9."""
    palette = np.random.default_rng(0).integers(0, 256, size=(10, 3, 1, 1))  # the same in every file
    rng = np.random.default_rng(seed)
    labels = [i % 10 for i in range(n)]
    images = np.clip(palette[labels] + rng.normal(0, 25, size=(n, 3, 32, 32)), 0, 255).astype(np.uint8)
    return {b"batch_label": b"synthetic", b"labels": labels,
            b"data": images.reshape(n, 3072), b"filenames": [f"img{i}.png".encode() for i in range(n)]}


def write_cifar(root: Path, per_batch: int = 20, n_test: int = 30) -> Path:
    """``root/cifar-10-batches-py`` with 5 training batches and a test batch, pickled as Python 3 does (protocol 4; the
    proxy test covers the Python 2 form of the official files)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(synthetic_batch(per_batch, i), protocol=4))
    (folder / "test_batch").write_bytes(pickle.dumps(synthetic_batch(n_test, 99), protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=4))
    return folder


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """A data dir holding a tiny synthetic CIFAR-10 (100 training and 30 test images)."""
    write_cifar(tmp_path / "data")
    return tmp_path / "data"


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n N``) the workers share the cores: each trains on its part of them,
    so that N workers do not oversubscribe the CPU."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        # The processes a test starts take as many: a run's numbers depend on the thread count (a
        # convolution's sums in another order), and tests compare runs in and out of process.
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# Each module's tests, summed seconds in CI's clean clone on 2 AVX2-only cores (eb8a125): the
# modules are handed out longest first, so the last ones, each a few seconds, even the workers out.
MODULE_SECONDS = {"test_sweep": 292, "test_proxy": 229, "test_distributed": 212, "test_resume": 198,
                  "test_notebook": 144, "test_train": 121, "test_datasets": 88, "test_report": 73,
                  "test_lr_finder": 66, "test_crafted_files": 52, "test_holdout": 30, "test_data": 27,
                  "test_seeds": 26, "test_run_plan": 24, "test_ema": 24, "test_candidates": 24}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each module's tests together and in order, the modules that take longest first (a module not
    measured yet just after the measured ones if it has ``slow`` tests, else at the end).
    pytest-xdist (``--dist loadfile``, pyproject.toml) gives a worker a whole module at a time, its
    module fixtures made once, the next one in this order when it is done with its tests."""
    slow_modules = {getattr(item, "module", None) for item in items if item.get_closest_marker("slow")}

    def order(item: pytest.Item) -> tuple[bool, int]:
        module = getattr(item, "module", None)
        name = getattr(module, "__name__", "").rpartition(".")[2]
        return module not in slow_modules and name not in MODULE_SECONDS, -MODULE_SECONDS.get(name, 0)

    items.sort(key=order)


@pytest.fixture(scope="session")
def proxy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real-photo proxy of CIFAR-10 in the official layout, written once per session.

    ``CIFAR_ONECYCLE_PROXY`` may name a folder that already holds it (saves about 10 s).
    """
    given = os.environ.get("CIFAR_ONECYCLE_PROXY")
    if given and (Path(given) / "cifar-10-batches-py" / "test_batch").is_file():
        return Path(given)
    tool = SHARED / "tools" / "cifar10_proxy.py"
    if not tool.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: CI must have ../shared beside the clone")
        pytest.skip(f"{tool} not found")
    # pytest-xdist gives each worker a session and a temporary folder of its own, below one for the
    # whole run: the first worker to get here writes the proxy there, under a lock, and the others
    # wait and read it (one conversion, 16 s on 2 AVX2-only cores, instead of one a worker).
    run_temp = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_temp = run_temp.parent
    dest = run_temp / "proxy"
    with open(run_temp / "proxy.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        if not (dest / "cifar-10-batches-py" / "test_batch").is_file():
            partial = run_temp / "proxy.partial"  # a worker killed mid-way leaves no half-written proxy
            shutil.rmtree(partial, ignore_errors=True)
            subprocess.run([sys.executable, str(tool), str(partial)], check=True, capture_output=True)
            partial.rename(dest)
    return dest


def py2_pickle(batch: dict) -> bytes:
    """``batch`` pickled as Python 2's cPickle wrote the official CIFAR-10 files: protocol 2, byte
    strings as Python 2 ``str`` (BINSTRING), arrays through ``numpy.core.multiarray._reconstruct``
    with their raw bytes in one string, MARK-delimited dict and lists."""
    def text(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + len(b).to_bytes(4, "little")) + b

    def integer(i: int) -> bytes:
        return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + i.to_bytes(4, "little", signed=True)

    def array(a: np.ndarray) -> bytes:
        dtype = (b"cnumpy\ndtype\n" + text(b"u1") + integer(0) + integer(1) + b"\x87R"
                 + b"(" + integer(3) + text(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb")
        new = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + text(b"b") + b"\x87R"
        shape = b"(" + b"".join(integer(n) for n in a.shape) + b"t"
        return new + b"(" + integer(1) + shape + dtype + b"\x89" + text(a.tobytes()) + b"tb"

    def value(v) -> bytes:
        if isinstance(v, bytes):
            return text(v)
        if isinstance(v, int):
            return integer(v)
        if isinstance(v, list):
            return b"](" + b"".join(value(x) for x in v) + b"e"
        return array(v)

    return b"\x80\x02}(" + b"".join(text(k) + value(v) for k, v in batch.items()) + b"u."


@pytest.fixture
def reads_forbidden(monkeypatch):
    """Files of 1 MB or more opened by ``cifar_onecycle.files.read_capped`` may be sized but not
    read: a test that a file over its ceiling is refused before its bytes are taken into memory."""
    import contextlib
    from types import SimpleNamespace

    import cifar_onecycle.files as files

    open_regular = files.open_regular

    @contextlib.contextmanager
    def sized_only(path):
        with open_regular(path) as real:
            if os.fstat(real.fileno()).st_size < 1 << 20:
                yield real
            else:
                yield SimpleNamespace(fileno=real.fileno, read=lambda *args: pytest.fail("read before the size check"))

    monkeypatch.setattr(files, "open_regular", sized_only)
