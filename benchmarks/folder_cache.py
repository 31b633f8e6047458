"""Time to read a folder of images (``dataset = "folder"``): decoding every file (no cache), then
from the cache the first read wrote, repeated.

    python benchmarks/folder_cache.py DIR [--repeats 3] [--out benchmarks/results/folder-cache-cpu.json]

DIR: train/<class>/ and test/<class>/ images, such as the CIFAR-10 proxy unpacked
(``tar xzf ../shared/data/cifar10-proxy.tar.gz -C DIR``). The cache file in DIR is removed first.
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

from cifar_onecycle.image_folder import CACHE, load_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    (args.folder / CACHE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    data = load_folder(args.folder)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        again = load_folder(args.folder)
        warm.append(time.perf_counter() - t0)
        assert torch.equal(again.train_images, data.train_images)
    result = {"images": len(data.train_images) + len(data.test_images), "classes": len(data.classes),
              "cold_seconds": round(cold, 2), "warm_seconds": [round(w, 2) for w in warm],
              "warm_median_seconds": round(statistics.median(warm), 2),
              "cache_bytes": (args.folder / CACHE).stat().st_size, "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
