"""Files a run writes and reads: whole, or not at all, and never larger than their kind can be.

Writes go through a temporary file and a rename (``atomic_write``). Reads of the files a run folder
holds, which may come from someone else, go through ``read_capped``: a file's size must not decide how
much memory the program takes, so each kind of file has a ceiling well above any file this program
writes, and a larger one is refused before it is read.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

try:
    import fcntl
except ImportError:  # Windows: folders are not locked there
    fcntl = None  # type: ignore[assignment]

from .errors import UserError, WriteError, as_setting

MB = 1 << 20
# The ceilings, each with what this program writes: the seed's model in fp32 is 26.3 MB as
# safetensors; a checkpoint holds the weights, SGD's momentum, a weight average (with ema_decay)
# and small states: 52.6 MB without the average, 79 MB with it; recipe.toml, metrics.csv,
# summary.json and seeds.json are a few kB (metrics.csv gains under 100 bytes an epoch).
MAX_WEIGHTS_BYTES = 64 * MB
MAX_CHECKPOINT_BYTES = 256 * MB
MAX_TEXT_BYTES = 16 * MB


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``, then
    fsync the folder, so that the rename itself survives a power cut.

    A kill at any instant leaves either the old file or the new one, never a torn one; on any error
    the temporary file is closed and removed, and an OSError becomes a ``WriteError`` naming the file.
    """
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(path, e.strerror or str(e)) from None
    try:
        with os.fdopen(fd, "wb") as f:  # owns the descriptor from here: closed on every path
            if hasattr(os, "fchmod"):  # not on Windows (before Python 3.13), whose files have no such bits
                os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; a run folder should be readable
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, mostly: the user's to fix, and nothing was lost
            raise WriteError(path, e.strerror or str(e)) from None
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # Windows opens no folder (and journals the rename itself)
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_regular(path: str | Path) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file. Opened without blocking and checked
    before any read: a FIFO would block the open (or the first read) until something writes to it,
    and a device can be read for ever. Anything else is an OSError (``strerror`` says what)."""
    # O_BINARY: Windows opens a descriptor in text mode otherwise (CRLF read as LF, a 0x1A byte as the end)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise OSError(errno.EINVAL, f"not a regular file but {kind}", str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path: str | Path, limit: int, what: str, hint: str, error: type[UserError] = UserError) -> bytes:
    """The bytes of ``path`` (a regular file: ``open_regular``), refusing a file over ``limit``
    bytes before reading it with ``error`` ("larger than any ``what``", then ``hint``). OSErrors (a
    missing file included) propagate for the caller to word."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(limit + 1) if size <= limit else b""  # bounded even if the file grows meanwhile
    if size > limit or len(raw) > limit:
        raise error(f"{path}: {max(size, len(raw)):,} bytes, larger than any {what} (at most {limit:,}); {hint}")
    return raw


# JSON a run writes nests 3 deep and holds integers of at most 13 digits (seeds, byte counts).
MAX_JSON_DEPTH = 32
MAX_JSON_INT_DIGITS = 30
_JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')


def parse_json(text: str | bytes) -> Any:
    """JSON from a file that may be someone else's: nesting deeper than ``MAX_JSON_DEPTH`` (checked
    before parsing: the parser's recursion would overflow) and integers of more than
    ``MAX_JSON_INT_DIGITS`` digits are a ``ValueError``, as malformed JSON is."""
    if isinstance(text, bytes):
        text = text.decode()
    depth = deepest = 0
    for bracket in re.findall(r"[\[\]{}]", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} deep")

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
            raise ValueError(f"an integer of {len(digits.lstrip('-'))} digits")
        return int(digits)

    return json.loads(text, parse_int=integer)


def safetensors_metadata(raw: bytes) -> Any:
    """The ``__metadata__`` of a safetensors file's bytes ({} when there is none): the header is 8
    bytes of length, then JSON, read by ``parse_json``."""
    n = int.from_bytes(raw[:8], "little")
    return parse_json(raw[8:8 + n]).get("__metadata__") or {}


def check_plain(value: Any, what: str, depth: int = 0) -> None:
    """A ``ValueError`` unless ``value`` is what JSON holds (None, booleans, strings, finite numbers,
    lists, and dicts with string keys), nested at most ``MAX_JSON_DEPTH`` deep: for values read
    from a checkpoint that go on into summary.json."""
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nests more than {MAX_JSON_DEPTH} deep")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{what} has a key of type {type(key).__name__}")
            check_plain(item, what, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_plain(item, what, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value) or \
            not isinstance(value, (type(None), bool, str, int, float)):
        raise ValueError(f"{what} holds {type(value).__name__} {str(value)[:40]}, which is not a plain finite value")


def refuse_a_file(path: Path, setting: str = "out") -> None:
    """A UserError naming ``setting`` if ``path``, where a folder is to be, is something else (a file,
    a FIFO)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{as_setting(setting)} {path}: exists and is not a folder; choose another")


def writable_folder(path: str | Path, setting: str = "out", create: bool = True) -> Path:
    """Create the folder ``path`` if needed (with ``create``; else a missing one cannot be written)
    and prove a file can be written there, before any work whose results would go there; a UserError
    naming ``setting`` otherwise. The proof is a file of a name no other file has, removed at once:
    the folder may be the user's own (a picture's), whose files must stay as they were."""
    path = Path(path)
    try:
        refuse_a_file(path, setting)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{as_setting(setting)} {path}: cannot write there ({e.strerror or e}); "
                        "choose another folder") from None
    return path


class FolderLock:
    """This process's hold on a folder it writes (a run's, a set of seeds', a sweep's), for the length
    of a ``with``: another process that asks for it meanwhile is refused with a UserError naming the
    folder and the ``setting`` that gave it (if any). Two processes writing one run folder would
    leave one's metrics beside the other's weights, and an overwrite would remove a running run's
    files under it.

    An advisory ``flock`` on the folder's own descriptor: no lock file to leave behind, and the
    kernel drops it when the descriptor closes, also when the process is killed (SIGKILL), so a
    lock is never stale. Where none can be had (Windows; a file system without
    flock on folders, as some NFS mounts; a folder not made yet), nothing is held and the work
    goes on: the lock guards against a mistake, it is not needed for a run to be right."""

    def __init__(self, path: str | Path, setting: str | None) -> None:
        self.path, self.setting = Path(path), setting
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        if fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # not there (yet): whatever uses it says so
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            given = f"{as_setting(self.setting)} " if self.setting else ""
            raise UserError(f"{given}{self.path}: in use by another process (a run, a set of seeds or a sweep "
                            f"writing there); wait for it to end, or stop it, or choose another folder") from None
        except OSError:  # no flock here: go on unheld
            os.close(fd)
            return self
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock
            self.fd = None
