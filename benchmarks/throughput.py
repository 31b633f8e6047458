"""Whole training step against the bare model step, alternating, in one run.

The whole step is ``cifar_onecycle.train`` itself (shuffle, gather, crop, flip, normalise, cutout,
schedule, forward, backward, SGD, bookkeeping, progress bar), measured as the images per second of
the second epoch of a 2-epoch run (the first warms up). The bare step is forward, backward and SGD
on one fixed, already normalised batch on the same device and precision. The two alternate, block
after block (``--blocks``, at least 5), so that drift in a shared machine's speed reaches both
sides; each block's ratio is its whole step over the mean of the bare blocks around it. The block
length (``--steps``, default ``auto``) is chosen from one timed step so that the benchmark takes at
most about ``--budget-s`` (10 minutes).

    python benchmarks/throughput.py [--blocks 5] [--steps auto] [--budget-s 540] [--device auto] [--precision auto]

Prints every block, the median ratio and its spread (min to max), and writes them as JSON, with the
commit, torch version, CPU model and precision, to ``--out`` (default
benchmarks/results/throughput-<device>.json). A median above 1.0 by more than the spread is a
measurement error to explain, not a result.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cifar_onecycle import Cifar10, Recipe, train
from cifar_onecycle.augment import normalize
from cifar_onecycle.device import device_name, resolve_device, resolve_placement, resolve_precision, synchronize
from cifar_onecycle.host_memory import freed_memory_kept
from cifar_onecycle.results import git_commit
from cifar_onecycle.run_setup import setup_run
from cifar_onecycle.step import make_optimizer


def bare_step(recipe: Recipe, fused: bool | None = None) -> Callable[[], None]:
    """One bare training step: the run's own step (``RunSetup.step``: model, optimizer, loss
    scaling, precision, compilation, loss, all as ``setup_run`` builds them for a run) on one fixed,
    already normalised batch: no shuffle, augmentation, schedule or bookkeeping. ``fused``:
    ``make_optimizer``'s switch, in place of the run's default."""
    device, _ = resolve_placement(recipe)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (recipe.batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (recipe.batch_size,), generator=generator)
    setup = setup_run(recipe.replace(train_subset=0, holdout=0), Cifar10(images, labels, images[:1], labels[:1]))
    if fused is not None:
        setup.optimizer = make_optimizer(setup.model, recipe, device, fused)
    inputs = normalize(images.to(device)).contiguous(memory_format=recipe.memory_format)
    targets = labels.to(device)

    def step() -> None:
        setup.step(inputs, targets, recipe.lr_max)

    return step


def bare_images_per_second(recipe: Recipe, steps: int, blocks: int = 1, warmup: int = 1,
                           fused: bool | None = None) -> list[float]:
    """Images per second of ``blocks`` timed blocks of ``steps`` bare steps, after ``warmup``
    untimed steps (with ``recipe.compile`` the first of them pays for the compilation)."""
    device, _ = resolve_placement(recipe)
    rates = []
    with freed_memory_kept():  # as train() keeps it
        step = bare_step(recipe, fused)
        for _ in range(warmup):
            step()
        for _ in range(blocks):
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            rates.append(steps * recipe.batch_size / (time.perf_counter() - t0))
    return rates


def random_run(steps: int, batch_size: int, device: str, precision: str,
               compile: bool = False) -> tuple[Recipe, Cifar10]:
    """A 2-epoch run of ``steps`` steps of ``batch_size`` an epoch on random pixels and labels (the
    speed of a step does not depend on what the images show), and its data. A small LR keeps
    random labels from diverging."""
    n = steps * batch_size
    recipe = Recipe(epochs=2, peak_epoch=1, batch_size=batch_size, train_subset=n, lr_max=0.01, device=device,
                    precision=precision, compile=compile)
    g = torch.Generator().manual_seed(0)
    data = Cifar10(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n,), generator=g),
                   torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (500,), generator=g))
    return recipe, data


def ratio_summary(name: str, ratios: list[float], started: float) -> dict:
    """Print the median of ``ratios`` (``name``, say "whole/bare") and their spread, min to max, with
    the seconds since ``started``; return them as the JSON files keep them."""
    median = statistics.median(ratios)
    print(f"ratio {name}: median {median:.3f}, spread {min(ratios):.3f} to {max(ratios):.3f} "
          f"({time.perf_counter() - started:.0f} s)")
    return {"ratios": ratios, "ratio_median": median, "ratio_min": min(ratios), "ratio_max": max(ratios)}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks of each side (at least 5)")
    ap.add_argument("--steps", default="auto", help="steps per timed block (an epoch of the run), or auto")
    ap.add_argument("--budget-s", type=float, default=540, help="what --steps auto aims the whole run at")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="auto", choices=Recipe.choices("device"))
    ap.add_argument("--precision", default="auto", choices=Recipe.choices("precision"))
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/throughput-<device>.json)")
    a = ap.parse_args()
    if a.blocks < 5:
        raise SystemExit("throughput: --blocks must be at least 5")
    device = resolve_device(a.device)
    precision = resolve_precision(a.precision, device)
    probe = Recipe(batch_size=a.batch_size, device=a.device, precision=a.precision, compile=a.compile)
    if a.steps == "auto":  # a block costs about 3 steps a step of its length: 2 epochs whole, 1 bare
        step_seconds = a.batch_size / bare_images_per_second(probe, 1, warmup=1)[0]
        steps = max(2, min(20, int((a.budget_s / (a.blocks * step_seconds) - 2) / 3)))
    else:
        steps = int(a.steps)

    recipe, data = random_run(steps, a.batch_size, device=a.device, precision=a.precision, compile=a.compile)
    print(f"device {device_name(device)} ({cpu_model()}), precision {precision}, batch {a.batch_size}, "
          f"{steps} steps a block, {a.blocks} blocks of each side", flush=True)
    started = time.perf_counter()
    bare = [bare_images_per_second(recipe, steps)[0]]
    whole = []
    for block in range(a.blocks):
        whole.append(train(recipe, data=data, progress=False).history[-1].images_per_second)
        bare.append(bare_images_per_second(recipe, steps)[0])
        print(f"block {block + 1}: bare {bare[-2]:8.1f}, whole {whole[-1]:8.1f}, bare {bare[-1]:8.1f} img/s",
              flush=True)
    each = [w / ((b0 + b1) / 2) for w, b0, b1 in zip(whole, bare, bare[1:], strict=False)]
    ratios = ratio_summary("whole/bare", each, started)
    out = a.out or Path(__file__).parent / "results" / f"throughput-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k not in ("compile", "out")
        ) + (" --compile" if a.compile else ""),
        "commit": git_commit(), "torch": torch.__version__, "device": device_name(device), "cpu": cpu_model(),
        "precision": precision, "batch_size": a.batch_size, "steps": steps, "blocks": a.blocks,
        "bare_images_per_second": bare, "whole_images_per_second": whole, **ratios,
        "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
