"""The convolutions on small images as matrix products (``conv3x3``) against oneDNN's kernels, on
this CPU, in one run.

1. Layers: each 3x3 convolution of the seed's network (its channels and image side) at the batch,
   channels_last, in ``--precision``, freed memory kept as a run keeps it: the forward, the input
   gradient and the weight gradient by oneDNN's kernels and by ``conv3x3``'s products (the forward
   with the input's patches, the weight gradient from those patches, as ``MatmulConv`` keeps them),
   then the layer's forward and backward together each way, and with its weight gradient alone a
   product (as below ``MATMUL_FORWARD_ROWS``); the median of ``--reps`` timings each (``switched``:
   a layer small enough for the products when the switch is on).
2. Runs: ``cifar_onecycle.train`` on the batch (2 epochs of ``--steps`` steps on random pixels; the
   second epoch's training images a second, as benchmarks/throughput.py reads it), with the switch
   on (every layer of at most ``MATMUL_PIXELS`` pixels, wholly by products from
   ``MATMUL_FORWARD_ROWS`` rows up) and off, alternating, ``--rounds`` of each, the first side
   turning with the round; each round's ratio is on over off.

    python benchmarks/conv_by_matmul.py [--rounds 5] [--steps 6] [--reps 5] [--precision auto]
                                        [--batch-size 512]

Prints every timing, the median ratio and its spread (min to max), and writes them as JSON, with the
commit, torch version, CPU model and precision, to ``--out`` (default
benchmarks/results/conv-by-matmul-cpu-<precision>.json, with ``-b<batch>`` before it for another batch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from cifar_onecycle import Cifar10, Recipe, run_setup, train
from cifar_onecycle.conv3x3 import (
    MATMUL_PIXELS,
    MatmulConv,
    matmul_conv,
    matmul_input_grad,
    matmul_weight_grad,
    patches,
)
from cifar_onecycle.device import cpu_has_amx, resolve_precision
from cifar_onecycle.host_memory import freed_memory_kept
from cifar_onecycle.results import git_commit
from throughput import cpu_model, random_run, ratio_summary

# The seed's 3x3 convolutions: (channels in, channels out, image side), Layer3's residual pair last.
LAYERS = ((3, 64, 32), (64, 128, 32), (128, 128, 16), (128, 256, 16), (256, 512, 8), (512, 512, 4))


def median_seconds(work: Callable[[], object], reps: int) -> float:
    work()  # oneDNN picks and caches its kernel on the first call
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        work()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_backward(x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor,
                     conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    conv(x, weight).backward(grad_out)
    x.grad = weight.grad = None


def layer_times(batch: int, dtype: torch.dtype, reps: int) -> list[dict]:
    rows = []
    for c_in, c_out, side in LAYERS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c_in, side, side, generator=g).to(dtype, memory_format=torch.channels_last)
        weight = torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5
        weight = weight.to(dtype, memory_format=torch.channels_last)
        grad_out = torch.randn(batch, c_out, side, side, generator=g).to(dtype, memory_format=torch.channels_last)
        x_patches = patches(x)
        layer = partial(forward_backward, x.clone().requires_grad_(), weight.clone().requires_grad_(), grad_out)
        works: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "forward": (partial(F.conv2d, x, weight, padding=1), partial(matmul_conv, x, weight)),
            "input_grad": (partial(conv2d_input, x.shape, weight, grad_out, padding=1),
                           partial(matmul_input_grad, grad_out, weight)),
            "weight_grad": (partial(conv2d_weight, x, weight.shape, grad_out, padding=1),
                            partial(matmul_weight_grad, x_patches, grad_out, c_in)),
            "layer": (partial(layer, partial(F.conv2d, padding=1)),
                      partial(layer, partial(MatmulConv.apply, forward_too=True))),
        }
        row: dict = {"c_in": c_in, "c_out": c_out, "side": side, "switched": side * side <= MATMUL_PIXELS}
        for name, (onednn, product) in works.items():
            row[f"{name}_onednn_ms"] = round(median_seconds(onednn, reps) * 1e3, 1)
            row[f"{name}_matmul_ms"] = round(median_seconds(product, reps) * 1e3, 1)
        # the layer with its weight gradient alone a product, as below MATMUL_FORWARD_ROWS
        weight_grad_only = median_seconds(partial(layer, partial(MatmulConv.apply, forward_too=False)), reps)
        row["layer_weight_grad_only_ms"] = round(weight_grad_only * 1e3, 1)
        rows.append(row)
        print(f"{c_in:4d} -> {c_out:4d} at {side:2d}x{side:<2d} (oneDNN / products, ms): " + ", ".join(
            f"{name} {row[f'{name}_onednn_ms']:.1f} / {row[f'{name}_matmul_ms']:.1f}" for name in works)
            + f" (the weight gradient alone: {weight_grad_only * 1e3:.1f})", flush=True)
        del x_patches
    return rows


def run(recipe: Recipe, data: Cifar10, on: bool) -> tuple[float, float]:
    """(the second epoch's images a second, its training loss) of a run with the switch ``on``."""
    run_setup.conv_by_matmul_pays = lambda device, precision: on
    last = train(recipe, data=data, progress=False).history[-1]
    return last.images_per_second, last.train_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="whole runs of each side (at least 3)")
    ap.add_argument("--steps", type=int, default=6, help="steps an epoch of each run")
    ap.add_argument("--reps", type=int, default=5, help="timings of each part of each layer, each way")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/"
                                              "conv-by-matmul-cpu-<precision>[-b<batch>].json)")
    a = ap.parse_args()
    if a.rounds < 3:
        raise SystemExit("conv_by_matmul: --rounds must be at least 3")
    precision = resolve_precision(a.precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, AMX {cpu_has_amx()}, precision {precision}, "
          f"batch {a.batch_size}", flush=True)
    started = time.perf_counter()
    with freed_memory_kept():  # as in a run: its largest tensors are not page-faulted in afresh at each call
        layers = layer_times(a.batch_size, dtype, a.reps)
    recipe, data = random_run(a.steps, a.batch_size, device="cpu", precision=precision)
    sides: dict[str, list[float]] = {"on": [], "off": []}
    losses: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(a.rounds):
        for side in (("on", "off") if r % 2 == 0 else ("off", "on")):
            rate, loss = run(recipe, data, side == "on")
            sides[side].append(rate)
            losses[side].append(loss)
            print(f"round {r + 1} {side:3s}: {rate:7.1f} images/s, training loss {loss:.4f}", flush=True)
    ratios = ratio_summary("on/off", [on / off for on, off in zip(sides["on"], sides["off"], strict=True)], started)
    batch = "" if a.batch_size == 512 else f"-b{a.batch_size}"
    out = a.out or Path(__file__).parent / "results" / f"conv-by-matmul-cpu-{precision}{batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python benchmarks/conv_by_matmul.py --rounds {a.rounds} --steps {a.steps} --reps {a.reps} "
                   f"--batch-size {a.batch_size} --precision {a.precision}",
        "commit": git_commit(), "torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "amx": cpu_has_amx(), "precision": precision, "batch_size": a.batch_size, "layers": layers,
        "steps": a.steps, "images_per_second": sides, "train_loss": losses, **ratios,
        "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
