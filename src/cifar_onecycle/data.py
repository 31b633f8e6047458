"""CIFAR-10 ("python version"): find, download, verify and load it without trusting pickle.

Lookup order in ``data_dir``: ``cifar-10-batches-py/`` as extracted; else ``cifar-10-python.tar.gz``
(md5-checked unless it is not the official file, then extracted); else the official archive is
downloaded (with a progress bar and an md5 check) unless downloads are off.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import pickletools
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError
from .files import read_capped

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Caps, each checked before the work it guards. The official batch files are about 31 MB, hold
# 10,000 images each and unpickle in about 31,000 opcodes, nested 5 deep, with about 20,000 memo
# entries; the official archive has 8 members and unpacks to about 178 MB.
MAX_BATCH_BYTES = 64 * 2**20
MAX_IMAGES_PER_FILE = 10_000
MAX_OPCODES = 200_000
MAX_NESTING = 32
MAX_MEMO_INDEX = 100_000
MAX_ARCHIVE_MEMBERS = 16
MAX_ARCHIVE_BYTES = 256 * 2**20
# The dtypes an array in a CIFAR-10 file may have: uint8 images, small integer labels.
_ARRAY_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global outside the whitelist, or uses one as no CIFAR-10 file does."""


class RefusedStructure(pickle.UnpicklingError):
    """The pickle stream is larger, deeper or stranger than any CIFAR-10 file."""


class _DType:
    """What ``numpy.dtype(name, align, copy)`` in a file becomes: a name checked against
    ``_ARRAY_DTYPES``, then the pickled state (byte order) checked by BUILD."""

    def __init__(self, name: Any, *args: Any) -> None:
        key = name.decode("latin1") if isinstance(name, bytes) else name
        if key not in _ARRAY_DTYPES:
            raise RefusedGlobal(f"dtype {key!r} is not allowed in a CIFAR-10 file")
        self.dtype = np.dtype(key)

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        order = order.decode("latin1") if isinstance(order, bytes) else order
        if order not in ("|", "<", "="):
            raise RefusedStructure(f"dtype state {state!r} is not a little-endian plain dtype")
        self.dtype = self.dtype.newbyteorder("<")


class _NDArrayName:
    """What ``numpy.ndarray`` in a file becomes: a name that ``_reconstruct`` accepts, and nothing
    that can be called (a file calling numpy.ndarray directly could give it strides and a buffer)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RefusedGlobal("numpy.ndarray may not be called by a CIFAR-10 file")


_NDARRAY = _NDArrayName()


class _Array:
    """What ``numpy.core.multiarray._reconstruct`` in a file becomes. Its BUILD state is checked
    and turned into a fresh C-ordered array that owns a copy of exactly the file's bytes: no
    strides, no offsets, no shared buffers, no shape the bytes do not fill."""

    def __init__(self, cls: Any, *args: Any) -> None:
        if cls is not _NDARRAY:
            raise RefusedGlobal("_reconstruct may only build a numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise RefusedStructure("array state is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType):
            raise RefusedStructure("array state has no checked dtype")
        if fortran or not isinstance(raw, (bytes, bytearray)):
            raise RefusedStructure("array data must be C-ordered raw bytes")
        if not (isinstance(shape, tuple) and len(shape) in (1, 2)
                and all(type(n) is int and n >= 0 for n in shape)):
            raise RefusedStructure(f"array shape {shape!r} is not N or N x columns")
        if shape[0] > MAX_IMAGES_PER_FILE:
            raise RefusedStructure(f"array of {shape[0]} rows; a CIFAR-10 file holds at most {MAX_IMAGES_PER_FILE}")
        if math.prod(shape) * dtype.dtype.itemsize != len(raw):
            raise RefusedStructure(f"array shape {shape} does not match its {len(raw)} bytes of data")
        self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape).copy()


def _scalar(dtype: Any, raw: Any) -> int:
    """What ``numpy.core.multiarray.scalar`` in a file becomes: an integer label, as a Python int."""
    if not isinstance(dtype, _DType) or not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.dtype.itemsize:
        raise RefusedStructure("a numpy scalar must be an integer of its dtype's size")
    return int(np.frombuffer(raw, dtype=dtype.dtype)[0])


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR-10 files hold: builtin containers, and numpy arrays and
    scalars rebuilt by the checked stand-ins above (no numpy class or function of the file's
    choosing is ever called). Any other global (``os.system``, ``builtins.eval``, ...) is refused
    before it can be called."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"global {module}.{name} is not allowed in a CIFAR-10 file") from None


_MARK = -1  # a MARK on the scan's stack
_MODIFIES_BELOW = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


def scan_pickle(data: bytes) -> None:
    """Walk the pickle stream's opcodes without building anything (``pickletools.genops``) and
    refuse, before the real unpickler runs, a stream of more than ``MAX_OPCODES`` opcodes, objects
    nested deeper than ``MAX_NESTING`` (counted through every opcode that nests, MARK or not: a
    tuple a million levels deep needs no MARK, and would overflow the C stack when it is freed),
    memo indices above ``MAX_MEMO_INDEX`` (the unpickler sizes its memo by the largest index), a
    memo read of an index never written, or a stack that does not add up."""
    stack: list[int] = []  # the nesting depth of each object on the unpickler's stack
    memo: dict[int, int] = {}
    for count, (opcode, arg, _) in enumerate(pickletools.genops(data), 1):
        if count > MAX_OPCODES:
            raise RefusedStructure(f"more than {MAX_OPCODES} pickle opcodes")
        name, before = opcode.name, opcode.stack_before
        if name == "MARK":
            stack.append(_MARK)
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[arg-type]  # PUT opcodes carry an int
            if index > MAX_MEMO_INDEX:
                raise RefusedStructure(f"memo index {index} (at most {MAX_MEMO_INDEX})")
            if not stack or stack[-1] == _MARK:
                raise RefusedStructure("memo write with nothing to remember")
            memo[index] = stack[-1]
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            if arg not in memo:  # GET opcodes carry an int
                raise RefusedStructure(f"memo index {arg} read before it was written")
            stack.append(memo[arg])
            continue
        popped: list[int] = []
        if pickletools.markobject in before:
            if _MARK not in stack:
                raise RefusedStructure(f"{name} without a MARK")
            mark = len(stack) - 1 - stack[::-1].index(_MARK)
            popped = stack[mark + 1:]
            del stack[mark:]
            below = before.index(pickletools.markobject)  # e.g. the list that APPENDS extends
        else:
            below = len(before)
        if len(stack) < below or _MARK in stack[len(stack) - below:]:
            raise RefusedStructure(f"{name} finds too few objects on the stack")
        base = stack[len(stack) - below:]
        del stack[len(stack) - below:]
        if name == "DUP":
            stack += base * 2
            continue
        if name in _MODIFIES_BELOW:  # the container below stays; it now holds the others
            depth = max(base[0], 1 + max(base[1:] + popped, default=0))
        else:
            depth = 1 + max(base + popped) if base or popped else 0
        if depth > MAX_NESTING:
            raise RefusedStructure(f"objects nested more than {MAX_NESTING} deep")
        stack += [depth] * len(opcode.stack_after)


def safe_load(path: Path) -> Any:
    """Unpickle a CIFAR-10 file: size cap, opcode scan (``scan_pickle``), then ``RestrictedUnpickler``
    (Python 2 strings come back as bytes). Every refusal is a one-line ``DatasetError``."""
    try:
        data = read_capped(path, MAX_BATCH_BYTES, "CIFAR-10 batch file", "replace it with the official file",
                           DatasetError)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise DatasetError(f"{path}: file is empty; delete it and extract or download CIFAR-10 again")
    try:
        scan_pickle(data)
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (RefusedGlobal, RefusedStructure) as e:
        raise DatasetError(f"{path}: refused ({e}); replace it with the official file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, RecursionError, OverflowError) as e:
        why = " ".join(str(e).split())[:200]  # pickle's own messages may span lines
        raise DatasetError(f"{path}: truncated or corrupt ({type(e).__name__}: {why}); "
                           f"replace it with the official file") from None


def _array(value: Any) -> Any:
    """A checked array in place of its stand-in; anything else as it is."""
    if isinstance(value, _Array):
        if value.array is None:
            raise DatasetError("an array in the file has no data")
        return value.array
    return value


def _key(d: dict, name: str) -> Any:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KeyError(name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (images uint8 [N, 3, 32, 32], labels int64 [N]), with every check."""
    d = safe_load(path)
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a dict, found {type(d).__name__}")
    try:
        data, labels = _array(_key(d, "data")), _array(_key(d, "labels"))
    except KeyError as e:
        raise DatasetError(f"{path}: missing key {e.args[0]!r}; not a CIFAR-10 batch file") from None
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}; replace it with the official file") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: data must be a uint8 array of shape N x 3072, found {desc}")
    if isinstance(labels, np.ndarray) and labels.ndim != 1:
        raise DatasetError(f"{path}: labels must be one integer per image, found shape {labels.shape}")
    if not isinstance(labels, (list, np.ndarray)) or not all(type(y) in (int, np.int64) or isinstance(y, np.integer)
                                                              for y in labels):
        raise DatasetError(f"{path}: labels must be a list of integers")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data) or len(data) == 0:
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels


@dataclass
class Cifar10:
    """The data set as uint8 NCHW tensors plus int64 labels (CPU until ``to`` moves them)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...] = CLASSES

    def to(self, device: torch.device | str) -> Cifar10:
        return Cifar10(self.train_images.to(device), self.train_labels.to(device), self.test_images.to(device),
                       self.test_labels.to(device), self.classes)


def load_cifar10(data_dir: str | Path = "data", download: bool = True,
                 progress: Callable[[int, int], None] | None = None, split: str = "both") -> Cifar10:
    """Load CIFAR-10 from ``data_dir`` (extracting or downloading it first when needed).

    ``split``: "both", or "test" to skip reading the 50,000 training images (for evaluation).
    """
    root = ensure_cifar10(Path(data_dir), download=download, progress=progress)
    empty = (torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    if split == "test":
        train = empty
    else:
        parts = [read_batch(root / f) for f in TRAIN_FILES]
        train = (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                 torch.from_numpy(np.concatenate([p[1] for p in parts])))
    test = read_batch(root / TEST_FILE)
    return Cifar10(train[0], train[1], torch.from_numpy(test[0]), torch.from_numpy(test[1]))


def _missing(folder: Path) -> list[str]:
    return [f for f in (*TRAIN_FILES, TEST_FILE) if not (folder / f).is_file()]


def ensure_cifar10(data_dir: Path, download: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Return the folder with the batch files, extracting or downloading the archive if needed."""
    try:
        return _ensure_cifar10(data_dir, download, progress)
    except OSError as e:  # a folder that cannot be listed or created: the cause is the path given
        raise DatasetError(f"data_dir {data_dir}: cannot use it ({e.strerror or e}); give a folder you can read "
                           f"and write", "data_dir") from None


def _ensure_cifar10(data_dir: Path, download: bool, progress: Callable[[int, int], None] | None) -> Path:
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetError(f"data_dir {data_dir}: is a file, not a folder; give the folder that holds "
                           f"'{FOLDER}/' or '{ARCHIVE}', or where the download should go", "data_dir")
    folder = data_dir / FOLDER
    if folder.is_dir():
        missing = _missing(folder)
        if missing:
            raise DatasetError(f"{folder}: missing {', '.join(missing)}; put the complete official "
                               f"'{FOLDER}' folder there or delete it to extract/download again")
        return folder
    archive = data_dir / ARCHIVE
    if not archive.is_file():
        if not download:
            raise DatasetError(f"CIFAR-10 not found in {data_dir}: put '{FOLDER}/' or '{ARCHIVE}' "
                               f"there (from {URL}), or allow the download")
        download_archive(archive, progress=progress)
    extract_archive(archive, data_dir)
    missing = _missing(folder)
    if missing:
        raise DatasetError(f"{archive}: archive lacks {', '.join(missing)}; it is not CIFAR-10 (python version)")
    return folder


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_archive(dest: Path, url: str = URL, md5: str | None = MD5,
                     progress: Callable[[int, int], None] | None = None, timeout: float = 30) -> None:
    """Download to ``dest.part``, check the md5, then rename: a broken download never looks whole."""
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            while block := r.read(1 << 20):
                f.write(block)
                done += len(block)
                if progress:
                    progress(done, total)
        if md5 and md5sum(part) != md5:
            raise DatasetError(f"{url}: downloaded file fails its md5 check; try again, or put "
                               f"'{ARCHIVE}' in {dest.parent} by hand")
        os.replace(part, dest)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        raise DatasetError(f"cannot download CIFAR-10 from {url} ({getattr(e, 'reason', e)}); "
                           f"put '{FOLDER}/' or '{ARCHIVE}' in {dest.parent} by hand") from None
    finally:
        part.unlink(missing_ok=True)


def download_bar(desc: str = "download CIFAR-10") -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback for ``load_cifar10`` that draws a tqdm bar of the
    download (bytes, with rate and time left); closed when the last byte arrives."""
    from tqdm.auto import tqdm

    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False)
        bar.update(done - bar.n)
        if total and done >= total:
            bar.close()

    return update


def extract_archive(archive: Path, data_dir: Path) -> None:
    """Extract into a temporary folder beside the target, then rename: no half-extracted data set.

    The archive's md5 is not required to match the official one (a re-packed copy or the offline
    proxy is fine): only its 'cifar-10-batches-py' folder is used, and every batch file in it is
    checked when it is read.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=data_dir))
    try:
        with tarfile.open(archive, "r:*") as tf:
            members: list[tarfile.TarInfo] = []
            unpacked = 0
            for m in tf:  # headers one by one: an archive of a million members is refused at the 17th
                if len(members) == MAX_ARCHIVE_MEMBERS:
                    raise DatasetError(f"{archive}: more than {MAX_ARCHIVE_MEMBERS} members (CIFAR-10 has 8); "
                                       f"refusing to extract")
                unpacked += m.size
                if unpacked > MAX_ARCHIVE_BYTES:
                    raise DatasetError(f"{archive}: unpacks to more than {MAX_ARCHIVE_BYTES:,} bytes (CIFAR-10: "
                                       f"about 178 MB); refusing to extract")
                members.append(m)
            members = [m for m in members if m.name.split("/")[0] == FOLDER]
            for m in members:
                if not (m.isfile() or m.isdir()) or ".." in Path(m.name).parts or m.name.startswith("/"):
                    raise DatasetError(f"{archive}: unsafe member {m.name!r}; refusing to extract")
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; members were checked above
                tf.extractall(tmp, members=members)
        if not (tmp / FOLDER).is_dir():
            raise DatasetError(f"{archive}: no '{FOLDER}/' inside; not CIFAR-10 (python version)")
        os.replace(tmp / FOLDER, data_dir / FOLDER)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DatasetError(f"{archive}: cannot extract ({e}); delete it and download again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
