"""The convolutions' weight gradient on small images as a matrix product (``conv3x3``) against
oneDNN's, on this CPU, in one run.

1. Layers: each 3x3 convolution of the seed's network (its channels and image side) at the batch:
   the weight gradient by oneDNN's kernel (``torch.nn.grad.conv2d_weight``) and by
   ``conv3x3.matmul_weight_grad`` (patches and product), the median of ``--reps`` timings each,
   channels_last, in ``--precision`` (``switched``: a layer small enough for the product when the
   switch is on).
2. Runs: ``cifar_onecycle.train`` on the seed's batch (2 epochs of ``--steps`` steps on random
   pixels; the second epoch's training images a second, as benchmarks/throughput.py reads it), with
   the switch on (every layer of at most ``MATMUL_WEIGHT_GRAD_PIXELS`` pixels) and off, alternating,
   ``--rounds`` of each, the first side turning with the round; each round's ratio is on over off.

    python benchmarks/conv_weight_grad.py [--rounds 5] [--steps 6] [--reps 5] [--precision auto]

Prints every timing, the median ratio and its spread (min to max), and writes them as JSON, with the
commit, torch version, CPU model and precision, to ``--out`` (default
benchmarks/results/conv-weight-grad-cpu-<precision>.json).
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
from torch.nn.grad import conv2d_weight

from cifar_onecycle import Cifar10, Recipe, run_setup, train
from cifar_onecycle.conv3x3 import MATMUL_WEIGHT_GRAD_PIXELS, matmul_weight_grad
from cifar_onecycle.device import cpu_has_amx, resolve_precision
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


def layer_times(batch: int, dtype: torch.dtype, reps: int) -> list[dict]:
    rows = []
    for c_in, c_out, side in LAYERS:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c_in, side, side, generator=g).to(dtype, memory_format=torch.channels_last)
        grad_out = torch.randn(batch, c_out, side, side, generator=g).to(dtype, memory_format=torch.channels_last)
        weight_shape = (c_out, c_in, 3, 3)
        onednn = median_seconds(partial(conv2d_weight, x, weight_shape, grad_out, padding=1), reps)
        product = median_seconds(partial(matmul_weight_grad, x, grad_out), reps)
        rows.append({"c_in": c_in, "c_out": c_out, "side": side, "onednn_ms": round(onednn * 1e3, 1),
                     "matmul_ms": round(product * 1e3, 1), "switched": side * side <= MATMUL_WEIGHT_GRAD_PIXELS})
        print(f"{c_in:4d} -> {c_out:4d} at {side:2d}x{side:<2d}: oneDNN {onednn * 1e3:7.1f} ms, "
              f"product {product * 1e3:7.1f} ms", flush=True)
    return rows


def run(recipe: Recipe, data: Cifar10, on: bool) -> tuple[float, float]:
    """(the second epoch's images a second, its training loss) of a run with the switch ``on``."""
    run_setup.matmul_weight_grad_pays = lambda device, precision: on
    last = train(recipe, data=data, progress=False).history[-1]
    return last.images_per_second, last.train_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="whole runs of each side (at least 3)")
    ap.add_argument("--steps", type=int, default=6, help="steps an epoch of each run")
    ap.add_argument("--reps", type=int, default=5, help="timings of each layer's gradient, each way")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/"
                                              "conv-weight-grad-cpu-<precision>.json)")
    a = ap.parse_args()
    if a.rounds < 3:
        raise SystemExit("conv_weight_grad: --rounds must be at least 3")
    precision = resolve_precision(a.precision, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, AMX {cpu_has_amx()}, precision {precision}, "
          f"batch {a.batch_size}", flush=True)
    started = time.perf_counter()
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
    out = a.out or Path(__file__).parent / "results" / f"conv-weight-grad-cpu-{precision}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": f"python benchmarks/conv_weight_grad.py --rounds {a.rounds} --steps {a.steps} --reps {a.reps} "
                   f"--batch-size {a.batch_size} --precision {a.precision}",
        "commit": git_commit(), "torch": torch.__version__, "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "amx": cpu_has_amx(), "precision": precision, "batch_size": a.batch_size, "layers": layers,
        "steps": a.steps, "images_per_second": sides, "train_loss": losses, **ratios,
        "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
