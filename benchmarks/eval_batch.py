"""Evaluation speed against the evaluation batch size: the seed's network scoring the same images
(``evaluation.evaluate``, as a run's evaluation does) at each size, the sizes in turn, repeated, so
that a drift of the machine touches every size alike. It backs ``device.CPU_EVAL_BATCH``.

    python benchmarks/eval_batch.py [--precision auto|fp32|bf16] [--images 2000] [--repeats 3]
        [--sizes 32,64,128,256,512,1000] [--out benchmarks/results/eval-batch-cpu.json]

Random uint8 images and an untrained model: the arithmetic is that of trained weights on real
images (BatchNorm in eval mode, no data-dependent work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from cifar_onecycle.device import cpu_has_native_bf16, resolve_precision
from cifar_onecycle.evaluation import evaluate
from cifar_onecycle.recipe import Recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="32,64,128,256,512,1000")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    precision = resolve_precision(args.precision, torch.device("cpu"))
    torch.manual_seed(0)
    recipe = Recipe()
    # torch's stubs leave out Module.to's memory_format, which it takes at run time
    model = recipe.model().to(memory_format=recipe.memory_format).eval()  # type: ignore[call-overload]
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.images,))
    evaluate(model, images[:256], labels[:256], batch_size=128, precision=precision)  # warm-up: oneDNN's kernels
    rates: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(args.repeats):
        for size in sizes:
            t0 = time.perf_counter()
            evaluate(model, images, labels, batch_size=size, precision=precision)
            rates[size].append(args.images / (time.perf_counter() - t0))
    median = {size: statistics.median(r) for size, r in rates.items()}
    result = {"precision": precision, "images": args.images, "repeats": args.repeats,
              "images_per_second": {str(s): [round(x, 1) for x in r] for s, r in rates.items()},
              "median_images_per_second": {str(s): round(m, 1) for s, m in median.items()},
              "fastest": max(median, key=lambda s: median[s]),
              "cpu": platform.processor() or platform.machine(), "native_bf16": cpu_has_native_bf16(),
              "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
