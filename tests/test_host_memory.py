"""Freed host memory kept while a run trains (host_memory.freed_memory_kept), seen through glibc's
own count of the bytes it serves from mappings of their own (mallinfo2's hblkhd). Where a block
comes from outside the setting depends on what the process freed before (glibc takes a free chunk
of the heap that fits before mapping one), so those checks run in a fresh process."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_onecycle import Cifar10, Recipe, dry_run, host_memory, lr_finder, run_plan, train, training
from cifar_onecycle.host_memory import freed_memory_kept

BIG = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): mapped apart unless mappings are off


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mallinfo2():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc 2.33 or later")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2


def mapped_apart(size: int = BIG) -> bool:
    """Whether a tensor of ``size`` bytes allocated now is served by a mapping of its own."""
    before = mallinfo2()().hblkhd
    tensor = torch.empty(size, dtype=torch.uint8)
    after = mallinfo2()().hblkhd
    del tensor
    return after - before >= size


def print_sequence() -> None:
    """Whether blocks are mapped apart: before, in a run, in a range test within it, in the run
    again, after it, and a block of 16 MB after it."""
    seen = [mapped_apart()]
    with freed_memory_kept():
        seen.append(mapped_apart())
        with freed_memory_kept():
            seen.append(mapped_apart())
        seen.append(mapped_apart())
    seen += [mapped_apart(), mapped_apart(16 * 2**20)]
    print(json.dumps(seen))


def sequence_in_a_fresh_process(**env: str) -> list[bool]:
    mallinfo2()  # or skip
    own = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_host_memory as t; t.print_sequence()")
    out = subprocess.run([sys.executable, "-c", code], env=own | env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_a_big_tensor_comes_from_the_heap_within_and_from_a_mapping_after():
    # below 32 MB from the heap after: where glibc's own threshold would have climbed
    assert sequence_in_a_fresh_process() == [True, False, False, False, True, False]


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}])
def test_a_users_malloc_settings_are_left_as_they_are(env):
    assert sequence_in_a_fresh_process(**env)[:5] == [True] * 5


def test_a_run_a_range_test_and_a_dry_run_keep_freed_memory_while_they_train(monkeypatch):
    mallinfo2()  # or skip
    host_memory.glibc.cache_clear()  # as this process's environment says
    if host_memory.glibc() is None:
        pytest.skip("malloc settings of the user's in the environment")
    g = torch.Generator().manual_seed(0)
    data = Cifar10(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(64) % 10,
                   torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(20) % 10)
    seen = []

    def epoch_seeing(*args, **kwargs):
        seen.append(("epoch", mapped_apart()))
        return train_epoch(*args, **kwargs)

    def sweeps_seeing(*args, **kwargs):
        seen.append(("range test", mapped_apart()))
        return sweeps(*args, **kwargs)

    def steps_seeing(*args, **kwargs):  # the dry run's timed steps: its estimate is of a run's
        seen.append(("dry run", mapped_apart()))
        return time_steps(*args, **kwargs)

    train_epoch, sweeps, time_steps = training.train_epoch, lr_finder._sweeps, run_plan.time_steps
    monkeypatch.setattr(training, "train_epoch", epoch_seeing)
    monkeypatch.setattr(lr_finder, "_sweeps", sweeps_seeing)
    monkeypatch.setattr(run_plan, "time_steps", steps_seeing)
    recipe = Recipe(epochs=2, peak_epoch=1, batch_size=32, device="cpu", precision="fp32")
    train(recipe, data=data, progress=False, report=False)
    lr_finder.lr_range_test(recipe, data, progress=False, num_iter=10)
    dry_run(recipe, data=data)
    assert seen == [("epoch", False), ("epoch", False), ("range test", False), ("dry run", False)]
