"""Does a process that trains several runs (a set of seeds, a one-worker sweep) compile once?

``--compile`` costs a compilation before the first step (65 s on a CPU, about 14 s on an H100),
which a single run pays in full. ``train_seeds`` and a one-worker ``sweep`` train their runs one
after another in one process, each with a model of its own. This trains ``--runs`` short compiled
runs (seeds 0, 1, ...) in one process and records, after each, its seconds and how many graphs
TorchDynamo has compiled so far; then clears TorchDynamo's caches (``torch._dynamo.reset``, as a
fresh process starts, though TorchInductor's cache on disk now holds the first run's kernels) and
trains the last seed again, and trains it once eagerly. The compilation cache starts empty (a new
``TORCHINDUCTOR_CACHE_DIR``), as on a machine's first compiled run. A run that
reuses another model's compiled graphs must train as the freshly compiled one does, to the last
digit where the device is deterministic (the CPU): the graphs may be shared, the weights not.

    python benchmarks/compile_reuse.py [--runs 3] [--device auto] [--compile-mode default] [--out FILE]

Random pixels and labels at a small LR and logit scale (what is timed does not depend on what the images show).
Writes the per-run seconds, graph counts and the three histories' comparison as JSON to ``--out``
(default benchmarks/results/compile-reuse-<device>.json).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# An empty compilation cache, as a first run on a machine meets it (set before torch reads it): the
# first run's seconds then carry the whole compilation, not what earlier processes left on disk.
CACHE = tempfile.mkdtemp(prefix="compile-reuse-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = CACHE
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from cifar_onecycle import Cifar10, Recipe, train  # noqa: E402
from cifar_onecycle.device import device_name, resolve_device  # noqa: E402
from cifar_onecycle.results import git_commit  # noqa: E402
from throughput import cpu_model  # noqa: E402


def timed_run(recipe: Recipe, data: Cifar10) -> dict[str, Any]:
    """One run's wall seconds, its history (per epoch: train loss, evaluation accuracy) and the
    number of graphs TorchDynamo has compiled in this process after it."""
    started = time.perf_counter()
    result = train(recipe, data=data, progress=False, report=False, checkpoints=False)
    return {"seed": recipe.seed, "seconds": round(time.perf_counter() - started, 2),
            "graphs_so_far": int(counters["stats"]["unique_graphs"]),
            "history": [[h.train_loss, h.eval_acc] for h in result.history]}


def largest_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="compiled runs in one process (at least 2)")
    ap.add_argument("--images", type=int, default=640, help="training images a run (random)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto", choices=Recipe.choices("device"))
    ap.add_argument("--precision", default="auto", choices=Recipe.choices("precision"))
    ap.add_argument("--compile-mode", default="default", choices=Recipe.choices("compile_mode"))
    ap.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/compile-reuse-<device>.json)")
    a = ap.parse_args()
    if a.runs < 2:
        raise SystemExit("compile_reuse: --runs must be at least 2")
    device = resolve_device(a.device)
    g = torch.Generator().manual_seed(0)
    data = Cifar10(torch.randint(0, 256, (a.images, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (a.images,), generator=g),
                   torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (200,), generator=g))
    recipe = Recipe(epochs=2, peak_epoch=1, batch_size=a.batch_size, eval_batch_size=100, lr_max=0.01,
                    logit_scale=0.125, device=a.device, precision=a.precision, compile=True,
                    compile_mode=a.compile_mode)
    print(f"device {device_name(device)} ({cpu_model()}), {a.runs} compiled runs in one process, "
          f"mode {a.compile_mode}", flush=True)
    runs = []
    for seed in range(a.runs):
        runs.append(timed_run(recipe.replace(seed=seed), data))
        print(f"seed {seed}: {runs[-1]['seconds']:.1f} s, graphs compiled so far {runs[-1]['graphs_so_far']}",
              flush=True)
    torch._dynamo.reset()  # as a fresh process: every graph traced and compiled again
    fresh = timed_run(recipe.replace(seed=a.runs - 1), data)
    eager = timed_run(recipe.replace(seed=a.runs - 1, compile=False), data)
    same = runs[-1]["history"] == fresh["history"]
    print(f"seed {a.runs - 1} compiled afresh: {fresh['seconds']:.1f} s; its history "
          f"{'the same to the last digit' if same else 'differs'} (largest difference "
          f"{largest_difference(runs[-1]['history'], fresh['history']):.3g}); eager: {eager['seconds']:.1f} s, "
          f"largest difference from the compiled run {largest_difference(runs[-1]['history'], eager['history']):.3g}")
    out = a.out or Path(__file__).parent / "results" / f"compile-reuse-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/compile_reuse.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "out"),
        "commit": git_commit(), "torch": torch.__version__, "device": device_name(device), "cpu": cpu_model(),
        "runs_in_one_process": runs, "last_seed_compiled_afresh": fresh, "last_seed_eager": eager,
        "reused_equals_fresh": same}, indent=1) + "\n")


if __name__ == "__main__":
    main()
