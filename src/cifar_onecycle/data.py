"""CIFAR-10 and CIFAR-100 ("python version"): find, download, verify and load them without
trusting pickle.

Lookup order in ``data_dir``, for a ``Source``: its folder (``cifar-10-batches-py/``,
``cifar-100-python/``) as extracted; else its archive (md5-checked unless it is not the official
file, then extracted); else the official archive is downloaded (with a progress bar and an md5
check) unless downloads are off.
"""
from __future__ import annotations

import contextlib
import hashlib
import lzma
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError, as_setting
from .files import open_regular, read_capped
from .recipe import CIFAR10_CLASSES, CIFAR100_CLASSES, short_number
from .safe_pickle import CheckedArray, Damaged, Refused, safe_loads

CLASSES = CIFAR10_CLASSES


@dataclass(frozen=True)
class Source:
    """One of the official "python version" data sets: where it comes from, what its files are
    called, and the caps each file is checked against before the work they guard."""

    name: str
    url: str
    md5: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_file: str
    label_key: str
    classes: tuple[str, ...]
    max_rows: int        # images a file may hold
    max_file_bytes: int  # a file's size
    archive_bytes: str   # what the official archive unpacks to, for messages

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file)


# The official batch files are about 31 MB and hold 10,000 images each; the archive has 8 members
# and unpacks to about 178 MB. CIFAR-100's train file holds 50,000 images (154 MB of pixels alone),
# its test file 10,000.
CIFAR10 = Source("CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                 tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", CIFAR10_CLASSES,
                 10_000, 64 * 2**20, "about 178 MB")
CIFAR100 = Source("CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                  "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", "cifar-100-python.tar.gz",
                  ("train",), "test", "fine_labels", CIFAR100_CLASSES, 50_000, 192 * 2**20, "about 187 MB")
SOURCES = {"cifar10": CIFAR10, "cifar100": CIFAR100}
# CIFAR-10's names, kept for callers of the first versions
URL, MD5, FOLDER, ARCHIVE = CIFAR10.url, CIFAR10.md5, CIFAR10.folder, CIFAR10.archive
TRAIN_FILES, TEST_FILE = CIFAR10.train_files, CIFAR10.test_file
MAX_BATCH_BYTES = CIFAR10.max_file_bytes
MAX_IMAGES_PER_FILE = CIFAR10.max_rows
MAX_ARCHIVE_MEMBERS = 16
MAX_ARCHIVE_BYTES = 256 * 2**20


def safe_load(path: Path, source: Source = CIFAR10) -> Any:
    """Unpickle a data set's file: size cap, then ``safe_pickle.safe_loads`` (Python 2 strings come
    back as bytes). Every refusal is a one-line ``DatasetError``."""
    try:
        data = read_capped(path, source.max_file_bytes, f"{source.name} batch file",
                           "replace it with the official file", DatasetError)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise DatasetError(f"{path}: file is empty; delete it and extract or download {source.name} again")
    try:
        return safe_loads(data, max_rows=source.max_rows)
    except Refused as e:
        raise DatasetError(f"{path}: refused ({e}); replace it with the official file") from None
    except Damaged as e:
        raise DatasetError(f"{path}: truncated or corrupt ({e}); replace it with the official file") from None


def _array(value: Any) -> Any:
    """A checked array in place of its stand-in; anything else as it is."""
    if isinstance(value, CheckedArray):
        if value.array is None:
            raise DatasetError("an array in the file has no data")
        return value.array
    return value


def _key(d: dict, name: str) -> Any:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KeyError(name)


def read_batch(path: Path, source: Source = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    """One data file as (images uint8 [N, 3, 32, 32], labels int64 [N]), with every check."""
    d = safe_load(path, source)
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a dict, found {type(d).__name__}")
    try:
        data, labels = _array(_key(d, "data")), _array(_key(d, source.label_key))
    except KeyError as e:
        raise DatasetError(f"{path}: missing key {e.args[0]!r}; not a {source.name} data file") from None
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
    if len(labels) != len(data) or len(data) == 0:
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    low, high, top = min(labels), max(labels), len(source.classes) - 1  # before the int64 conversion (2**70)
    if low < 0 or high > top:
        raise DatasetError(f"{path}: labels must lie in 0..{top}, found "
                           f"{short_number(int(low))}..{short_number(int(high))}")
    labels = np.asarray(labels, dtype=np.int64)
    return data.reshape(-1, 3, 32, 32), labels


@dataclass
class LabelledImages:
    """A data set as uint8 NCHW tensors plus int64 labels (CPU until ``to`` moves them), with its
    classes' names in label order."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...] = CIFAR10_CLASSES
    skipped: tuple[str, ...] = ()  # a folder's images left out as unreadable (``skip_bad_images``)

    def to(self, device: torch.device | str) -> LabelledImages:
        return LabelledImages(self.train_images.to(device), self.train_labels.to(device),
                              self.test_images.to(device), self.test_labels.to(device), self.classes, self.skipped)


Cifar10 = LabelledImages  # the name of the first versions, when CIFAR-10 was the only source


def recorded_data_dir(recorded: str, source: str | Path) -> str:
    """A data folder that a file of a run (``source``) recorded: a hint to read from, never a folder
    to create or download into (the file may be someone else's), so it must be there already."""
    if not os.path.isdir(recorded):
        raise DatasetError(f"{source} names the data folder {recorded}, which is not there; give "
                           f"{as_setting('data_dir')}")
    return recorded


def load_cifar10(data_dir: str | Path = "data", download: bool = True,
                 progress: Callable[[int, int], None] | None = None, split: str = "both") -> LabelledImages:
    """Load CIFAR-10 from ``data_dir`` (extracting or downloading it first when needed).

    ``split``: "both", or "test" to skip reading the 50,000 training images (for evaluation).
    """
    return load_source(CIFAR10, data_dir, download, progress, split)


def load_source(source: Source, data_dir: str | Path = "data", download: bool = True,
                progress: Callable[[int, int], None] | None = None, split: str = "both") -> LabelledImages:
    """Load ``source`` (CIFAR-10 or CIFAR-100) from ``data_dir``, as ``load_cifar10`` does."""
    root = ensure_source(Path(data_dir), source, download=download, progress=progress)
    empty = (torch.empty(0, 3, 32, 32, dtype=torch.uint8), torch.empty(0, dtype=torch.int64))
    if split == "test":
        train = empty
    else:
        parts = [read_batch(root / f, source) for f in source.train_files]
        train = (torch.from_numpy(np.concatenate([p[0] for p in parts])),
                 torch.from_numpy(np.concatenate([p[1] for p in parts])))
    test = read_batch(root / source.test_file, source)
    return LabelledImages(train[0], train[1], torch.from_numpy(test[0]), torch.from_numpy(test[1]), source.classes)


def _missing(folder: Path, source: Source) -> list[str]:
    return [f for f in source.files if not (folder / f).is_file()]


def ensure_cifar10(data_dir: Path, download: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Return the folder with CIFAR-10's batch files, extracting or downloading the archive if needed."""
    return ensure_source(data_dir, CIFAR10, download, progress)


def ensure_source(data_dir: Path, source: Source, download: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Return the folder with ``source``'s files, extracting or downloading its archive if needed."""
    try:
        return _ensure(data_dir, source, download, progress)
    except OSError as e:  # a folder that cannot be listed or created: the cause is the path given
        raise DatasetError(f"{as_setting('data_dir')} {data_dir}: cannot use it ({e.strerror or e}); give a folder "
                           f"you can read and write") from None


def _ensure(data_dir: Path, source: Source, download: bool, progress: Callable[[int, int], None] | None) -> Path:
    if data_dir.exists() and not data_dir.is_dir():
        raise DatasetError(f"{as_setting('data_dir')} {data_dir}: is a file, not a folder; give the folder that holds "
                           f"'{source.folder}/' or '{source.archive}', or where the download should go")
    folder = data_dir / source.folder
    if not folder.is_dir() and data_dir.name == source.folder:  # the batches' own folder, given for its parent
        folder = data_dir
    if folder.is_dir():
        missing = _missing(folder, source)
        if missing:
            raise DatasetError(f"{folder}: missing {', '.join(missing)}; put the complete official "
                               f"'{source.folder}' folder there or delete it to extract/download again")
        return folder
    archive = data_dir / source.archive
    if archive.exists() and not archive.is_file():  # a FIFO or device would block or never end
        raise DatasetError(f"{archive}: not a regular file but a {'FIFO' if archive.is_fifo() else 'folder or device'}"
                           f"; put the official archive there or remove it")
    if not archive.is_file():
        if not download:
            raise DatasetError(f"{source.name} not found in {data_dir}: put '{source.folder}/' or '{source.archive}' "
                               f"there (from {source.url}), or allow the download")
        download_archive(archive, source, progress)
    extract_archive(archive, data_dir, source)
    missing = _missing(folder, source)
    if missing:
        raise DatasetError(f"{archive}: archive lacks {', '.join(missing)}; it is not {source.name} (python version)")
    return folder


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_archive(dest: Path, source: Source = CIFAR10,
                     progress: Callable[[int, int], None] | None = None, timeout: float = 30) -> None:
    """Download ``source``'s archive to ``dest.part``, check its md5 (unless ``source.md5`` is
    empty), then rename: a broken download never looks whole."""
    url, md5 = source.url, source.md5
    part = dest.with_name(dest.name + ".part")
    # The folders this download makes, deepest first: a failed one removes them again (when still
    # empty), so that a mistyped --data-dir or no network leaves no empty folder behind.
    made = [folder for folder in (dest.parent, *dest.parent.parents) if not folder.exists()]
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
                               f"'{source.archive}' in {dest.parent} by hand")
        os.replace(part, dest)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        raise DatasetError(f"cannot download {source.name} from {url} ({getattr(e, 'reason', e)}); "
                           f"put '{source.folder}/' or '{source.archive}' in {dest.parent} by hand") from None
    finally:
        part.unlink(missing_ok=True)
        if not dest.is_file():
            for folder in made:
                with contextlib.suppress(OSError):  # one that now holds something else stays
                    folder.rmdir()


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


# A GNU long-name or a PAX header is read whole, into memory, before the member it describes; a
# name is at most 4 KB on Linux, and the official archive has neither.
MAX_TAR_HEADER_BYTES = 64 * 2**10
_TAR_NAME_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                     tarfile.SOLARIS_XHDTYPE)


class _OversizedHeader(Exception):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing a long-name or PAX header over ``MAX_TAR_HEADER_BYTES``
    before tarfile reads it (it reads the size the header declares in one piece: 8 GB declared in a
    1 KB archive was a MemoryError). ``_proc_member`` is where every header kind is dispatched, in
    every Python this package supports."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_NAME_HEADERS and self.size > MAX_TAR_HEADER_BYTES:
            raise _OversizedHeader(f"a name or PAX header of {self.size:,} bytes (at most {MAX_TAR_HEADER_BYTES:,})")
        return super()._proc_member(archive)  # type: ignore[misc]


def extract_archive(archive: Path, data_dir: Path, source: Source = CIFAR10) -> None:
    """Extract into a temporary folder beside the target, then rename: no half-extracted data set.

    The archive's md5 is not required to match the official one (a re-packed copy or the offline
    proxy is fine): only its data folder ('cifar-10-batches-py', 'cifar-100-python') is used, and
    every file in it is checked when it is read.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".cifar-extract-", dir=data_dir))
    try:
        with open_regular(archive) as raw, tarfile.open(fileobj=raw, mode="r:*", tarinfo=_BoundedTarInfo) as tf:
            members: list[tarfile.TarInfo] = []
            unpacked = 0
            for m in tf:  # headers one by one: an archive of a million members is refused at the 17th
                if len(members) == MAX_ARCHIVE_MEMBERS:
                    raise DatasetError(f"{archive}: more than {MAX_ARCHIVE_MEMBERS} members (the official archives "
                                       f"have at most 8); "
                                       f"refusing to extract")
                unpacked += m.size
                if unpacked > MAX_ARCHIVE_BYTES:
                    raise DatasetError(f"{archive}: unpacks to more than {MAX_ARCHIVE_BYTES:,} bytes ({source.name}: "
                                       f"{source.archive_bytes}); refusing to extract")
                members.append(m)
            members = [m for m in members if m.name.split("/")[0] == source.folder]
            for m in members:
                if not (m.isfile() or m.isdir()) or ".." in Path(m.name).parts or m.name.startswith("/"):
                    raise DatasetError(f"{archive}: unsafe member {m.name!r}; refusing to extract")
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - older Pythons; members were checked above
                tf.extractall(tmp, members=members)
        if not (tmp / source.folder).is_dir():
            raise DatasetError(f"{archive}: no '{source.folder}/' inside; not {source.name} (python version)")
        os.replace(tmp / source.folder, data_dir / source.folder)
    except _OversizedHeader as e:
        raise DatasetError(f"{archive}: {e}; refusing to extract") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        why = " ".join(str(e).split())  # tarfile lists each compression it tried on a line of its own
        raise DatasetError(f"{archive}: cannot extract ({why}); delete it and download again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
