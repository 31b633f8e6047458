"""Freed host memory kept while a run trains (host_memory.freed_memory_kept), seen through glibc's
own count of the bytes it serves from mappings of their own (mallinfo2's hblkhd)."""
from __future__ import annotations

import ctypes

import pytest
import torch

from cifar_onecycle import Cifar10, Recipe, host_memory, lr_finder, train, training
from cifar_onecycle.host_memory import freed_memory_kept

BIG = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): mapped apart unless mappings are off


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@pytest.fixture
def libc():
    host_memory.glibc.cache_clear()
    libc = host_memory.glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc 2.33 or later, or MALLOC_* settings in the environment")
    libc.mallinfo2.restype = MallInfo2
    yield libc
    host_memory.glibc.cache_clear()


def mapped_apart(libc) -> bool:
    """Whether a big tensor allocated now is served by a mapping of its own."""
    before = libc.mallinfo2().hblkhd
    big = torch.empty(BIG, dtype=torch.uint8)
    after = libc.mallinfo2().hblkhd
    del big
    return after - before >= BIG


def test_a_big_tensor_comes_from_the_heap_within_and_from_a_mapping_after(libc):
    assert mapped_apart(libc)
    with freed_memory_kept():
        assert not mapped_apart(libc)
        with freed_memory_kept():  # a run's range test inside the run
            assert not mapped_apart(libc)
        assert not mapped_apart(libc)  # the inner end leaves the outer run's setting
    assert mapped_apart(libc)


def test_a_users_malloc_settings_are_left_as_they_are(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    host_memory.glibc.cache_clear()
    with freed_memory_kept():
        assert mapped_apart(libc)
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    host_memory.glibc.cache_clear()
    with freed_memory_kept():
        assert mapped_apart(libc)


def test_a_run_and_a_range_test_keep_freed_memory_while_they_train(libc, monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = Cifar10(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(64) % 10,
                   torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(20) % 10)
    seen = []
    train_epoch, sweeps = training.train_epoch, lr_finder._sweeps

    def epoch_seeing(*args, **kwargs):
        seen.append(("epoch", mapped_apart(libc)))
        return train_epoch(*args, **kwargs)

    def sweeps_seeing(*args, **kwargs):
        seen.append(("range test", mapped_apart(libc)))
        return sweeps(*args, **kwargs)

    monkeypatch.setattr(training, "train_epoch", epoch_seeing)
    monkeypatch.setattr(lr_finder, "_sweeps", sweeps_seeing)
    recipe = Recipe(epochs=2, peak_epoch=1, batch_size=32, device="cpu", precision="fp32")
    train(recipe, data=data, progress=False, report=False)
    lr_finder.lr_range_test(recipe, data, progress=False, num_iter=10)
    assert seen == [("epoch", False), ("epoch", False), ("range test", False)]
    assert mapped_apart(libc)  # glibc's own behaviour again once they end
