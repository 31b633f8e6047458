"""Unpickling without trusting the file: what NumPy arrays and builtin containers in a pickle
(the CIFAR "python version" files) can be read as, and nothing else.

A pickle can call any function with any arguments, and ask for any amount of memory. So the stream
is walked first (``scan_pickle``: its length, nesting depth and memo indices capped) and then
unpickled by ``RestrictedUnpickler``, which admits builtin containers and numpy arrays and scalars
rebuilt by checked stand-ins (no numpy class or function of the file's choosing is ever called).
``safe_loads`` does both; every refusal is ``Refused``, every broken stream ``Damaged``.
"""
from __future__ import annotations

import functools
import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

# Caps on the stream. The official CIFAR-10 batch files unpickle in about 31,000 opcodes, nested 5
# deep, with about 20,000 memo entries.
MAX_OPCODES = 200_000
MAX_NESTING = 32
MAX_MEMO_INDEX = 100_000
# The dtypes an array may have: uint8 images, small integer labels.
_ARRAY_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}


class Refused(pickle.UnpicklingError):
    """The stream asks for something no admitted file holds (a global, a structure, a size)."""


class RefusedGlobal(Refused):
    """The file names a global outside the whitelist, or uses one as no admitted file does."""


class RefusedStructure(Refused):
    """The pickle stream is larger, deeper or stranger than any admitted file."""


class Damaged(Exception):
    """The stream is truncated or corrupt (pickle's own error, in one line)."""


# A CIFAR file takes about 3 opcodes and 2 memo entries a row (a label, a file name); the caps allow
# 20 and 10, and never less than for 10,000 rows.
OPCODES_PER_ROW, MEMO_PER_ROW = 20, 10


def safe_loads(data: bytes, max_rows: int) -> Any:
    """Unpickle ``data``: ``scan_pickle`` (its caps scaled to ``max_rows``), then
    ``RestrictedUnpickler`` with arrays of at most ``max_rows`` rows (Python 2 strings come back as
    bytes)."""
    rows = max(max_rows, 10_000)
    try:
        scan_pickle(data, OPCODES_PER_ROW * rows, MEMO_PER_ROW * rows)
        return RestrictedUnpickler(io.BytesIO(data), max_rows=max_rows, encoding="bytes").load()
    except Refused:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, RecursionError, OverflowError) as e:
        why = " ".join(str(e).split())[:200]  # pickle's own messages may span lines
        raise Damaged(f"{type(e).__name__}: {why}") from None


class _DType:
    """What ``numpy.dtype(name, align, copy)`` in a file becomes: a name checked against
    ``_ARRAY_DTYPES``, then the pickled state (byte order) checked by BUILD."""

    def __init__(self, name: Any, *args: Any) -> None:
        key = name.decode("latin1") if isinstance(name, bytes) else name
        if key not in _ARRAY_DTYPES:
            raise RefusedGlobal(f"dtype {key!r} is not allowed in this file")
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
        raise RefusedGlobal("numpy.ndarray may not be called by this file")


_NDARRAY = _NDArrayName()


class CheckedArray:
    """What ``numpy.core.multiarray._reconstruct`` in a file becomes. Its BUILD state is checked
    and turned into a fresh C-ordered array that owns a copy of exactly the file's bytes: no
    strides, no offsets, no shared buffers, no shape the bytes do not fill."""

    def __init__(self, cls: Any, *args: Any, max_rows: int) -> None:
        if cls is not _NDARRAY:
            raise RefusedGlobal("_reconstruct may only build a numpy.ndarray")
        self.array: np.ndarray | None = None
        self.max_rows = max_rows

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
        if shape[0] > self.max_rows:
            raise RefusedStructure(f"array of {shape[0]} rows; this kind of file holds at most {self.max_rows}")
        if math.prod(shape) * dtype.dtype.itemsize != len(raw):
            raise RefusedStructure(f"array shape {shape} does not match its {len(raw)} bytes of data")
        self.array = np.frombuffer(raw, dtype=dtype.dtype).reshape(shape).copy()


def _scalar(dtype: Any, raw: Any) -> int:
    """What ``numpy.core.multiarray.scalar`` in a file becomes: an integer label, as a Python int."""
    if not isinstance(dtype, _DType) or not isinstance(raw, (bytes, bytearray)) or len(raw) != dtype.dtype.itemsize:
        raise RefusedStructure("a numpy scalar must be an integer of its dtype's size")
    return int(np.frombuffer(raw, dtype=dtype.dtype)[0])


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): CheckedArray,
    ("numpy._core.multiarray", "_reconstruct"): CheckedArray,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what the official CIFAR files hold: builtin containers, and numpy arrays (of at
    most ``max_rows`` rows) and scalars rebuilt by the checked stand-ins above (no numpy class or
    function of the file's choosing is ever called). Any other global (``os.system``,
    ``builtins.eval``, ...) is refused before it can be called."""

    def __init__(self, file: Any, *, max_rows: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.max_rows = max_rows

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"global {module}.{name} is not allowed in this file") from None
        return functools.partial(CheckedArray, max_rows=self.max_rows) if found is CheckedArray else found


_MARK = -1  # a MARK on the scan's stack
_MODIFIES_BELOW = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}


def scan_pickle(data: bytes, max_opcodes: int = MAX_OPCODES, max_memo_index: int = MAX_MEMO_INDEX) -> None:
    """Walk the pickle stream's opcodes without building anything (``pickletools.genops``) and
    refuse, before the real unpickler runs, a stream of more than ``max_opcodes`` opcodes, objects
    nested deeper than ``MAX_NESTING`` (counted through every opcode that nests, MARK or not: a
    tuple a million levels deep needs no MARK, and would overflow the C stack when it is freed),
    memo indices above ``max_memo_index`` (the unpickler sizes its memo by the largest index), a
    memo read of an index never written, or a stack that does not add up."""
    stack: list[int] = []  # the nesting depth of each object on the unpickler's stack
    memo: dict[int, int] = {}
    for count, (opcode, arg, _) in enumerate(pickletools.genops(data), 1):
        if count > max_opcodes:
            raise RefusedStructure(f"more than {max_opcodes:,} pickle opcodes")
        name, before = opcode.name, opcode.stack_before
        if name == "MARK":
            stack.append(_MARK)
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else int(arg)  # type: ignore[arg-type]  # PUT opcodes carry an int
            if index > max_memo_index:
                raise RefusedStructure(f"memo index {index} (at most {max_memo_index:,})")
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
