"""Whole training step against the bare model step, side by side in one run.

The whole step is ``cifar_onecycle.train`` itself (shuffle, gather, crop, flip, normalise, cutout,
schedule, forward, backward, SGD, bookkeeping, progress bar), measured as the images per second of
its second epoch (the first warms up). The bare step is forward, backward and SGD on one fixed,
already normalised batch on the same device and precision. The bare step is timed before and
after the training run and averaged, so drift in a shared machine's speed hits both sides.

    python benchmarks/throughput.py [--steps 6] [--batch-size 512] [--device auto] [--precision auto]

Prints both speeds and their ratio (target on a CPU: >= 0.95) and writes them as JSON to
benchmarks/results/throughput-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from cifar_onecycle import Cifar10, Recipe, ResNet9, train
from cifar_onecycle.augment import normalize
from cifar_onecycle.train import autocast, device_name, make_optimizer, resolve_device, resolve_precision


def bare_step(recipe: Recipe, fused: bool | None = None) -> Callable[[], None]:
    """One bare training step (forward, backward, SGD on one fixed, already normalised batch) of the
    recipe's model, optimizer (``fused``: ``make_optimizer``'s switch), precision and compilation."""
    device = resolve_device(recipe.device)
    precision = resolve_precision(recipe.precision, device)
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = ResNet9(logit_scale=recipe.logit_scale).to(device, memory_format=fmt)
    opt = make_optimizer(model, recipe, device, fused)
    step_model = torch.compile(model, mode=recipe.compile_mode) if recipe.compile else model
    x = normalize(torch.randint(0, 256, (recipe.batch_size, 3, 32, 32), dtype=torch.uint8, device=device))
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (recipe.batch_size,), device=device)

    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(step_model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare_images_per_second(recipe: Recipe, steps: int, blocks: int = 1, warmup: int = 1,
                           fused: bool | None = None) -> list[float]:
    """Images per second of ``blocks`` timed blocks of ``steps`` bare steps, after ``warmup``
    untimed steps (with ``recipe.compile`` the first of them pays for the compilation)."""
    step = bare_step(recipe, fused)
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(blocks):
        synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize()
        rates.append(steps * recipe.batch_size / (time.perf_counter() - t0))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="steps per timed block (an epoch of the run)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()

    n = a.steps * a.batch_size
    # Random pixels and labels: the speed of a step does not depend on what the images show. A small
    # LR keeps random labels from diverging.
    recipe = Recipe(epochs=2, peak_epoch=1, batch_size=a.batch_size, train_subset=n, lr_max=0.01,
                    device=a.device, precision=a.precision, compile=a.compile)
    g = torch.Generator().manual_seed(0)
    data = Cifar10(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (n,), generator=g),
                   torch.randint(0, 256, (500, 3, 32, 32), dtype=torch.uint8, generator=g),
                   torch.randint(0, 10, (500,), generator=g))
    device = resolve_device(a.device)
    precision = resolve_precision(a.precision, device)
    print(f"device {device_name(device)}, precision {precision}, batch {a.batch_size}, {a.steps} steps a block",
          flush=True)
    bare_before = bare_images_per_second(recipe, a.steps)[0]
    print(f"bare model step (before): {bare_before:9.1f} img/s", flush=True)
    run = train(recipe, data=data, progress=False)
    whole = run.history[-1].images_per_second
    print(f"whole training step:      {whole:9.1f} img/s (epoch 2 of train())", flush=True)
    bare_after = bare_images_per_second(recipe, a.steps)[0]
    print(f"bare model step (after):  {bare_after:9.1f} img/s", flush=True)
    bare = (bare_before + bare_after) / 2
    ratio = whole / bare
    print(f"ratio whole/bare: {ratio:.3f} (target >= 0.95)")
    out = Path(__file__).parent / "results" / f"throughput-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k != "compile") + (" --compile" if a.compile else ""),
        "device": device_name(device), "precision": precision, "batch_size": a.batch_size, "steps": a.steps,
        "torch": torch.__version__, "bare_images_per_second": [bare_before, bare_after],
        "whole_images_per_second": whole, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
