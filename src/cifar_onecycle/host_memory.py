"""Freed host memory kept for reuse while a run trains: its largest tensors are not mapped afresh
every step.

glibc's malloc serves a block above its mmap threshold (32 MB at most) with a new mapping of the
kernel's and gives it back when freed, so that a CPU run page-faults its largest tensors in again
at every step: a batch of 512 through the seed's first layers makes 67 MB tensors in bf16, 134 MB
in fp32. With no mappings and no trimming, freed blocks stay in the heap for the next step. Measured
on 2 cores of an Intel Xeon with AMX (``benchmarks/host_memory.py``; benchmarks/results/README.md,
"Freed memory kept on a CPU"): the `seed` recipe's training pass 1.37 times as fast in bf16 (1.33 to
1.45 over 5 rounds) and 1.17 times in fp32 (1.09 to 1.22), for a peak resident memory 1.41 and 1.28
times as large. Where memory goes does not touch the arithmetic: a run trains to the same digits.

A process whose user chose malloc's settings (``MALLOC_*`` variables, ``GLIBC_TUNABLES``) keeps
them, and other C libraries (macOS, Windows, musl) are left as they are. An allocator put in front
of glibc (``LD_PRELOAD``: tcmalloc, jemalloc) serves every block itself, and these settings then
reach only glibc's idle one: tcmalloc was as fast, 1.39 times (1.30 to 1.56), with 0.92 of the
memory.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterator
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (glibc's malloc.h)
DEFAULT_MMAP_MAX = 65536
# Any mallopt call stops glibc's threshold from climbing with the mapped blocks freed, as it does by
# default up to 32 MB (and trimming at twice it): after a run it is left where a process that frees
# big tensors brings it.
MMAP_THRESHOLD_AFTER = 32 * 2**20
KEEP_ALL = 2**31 - 1  # mallopt takes a C int

_lock = threading.Lock()
_runs = 0  # runs of this process inside freed_memory_kept (a run's range test is a run within it)


@functools.cache
def glibc() -> Any:
    """The process's glibc, or None where malloc is not glibc's to tune."""
    if any(name.startswith("MALLOC_") for name in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has all three)
    except (OSError, TypeError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[None]:
    """Within: freed host memory stays in the heap for reuse. After the outermost: blocks over 32
    MB mapped apart again, as by default, and the heap's free memory handed back to the system."""
    global _runs
    libc = glibc()
    with _lock:
        _runs += 1
        if libc is not None and _runs == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_ALL)
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if libc is not None and _runs == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_AFTER)
                libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_AFTER)
                libc.malloc_trim(0)
