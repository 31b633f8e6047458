"""Time to read a folder of images (``dataset = "folder"``): decoding every file (no cache) with each
thread count of ``--threads`` (``images.load_images``; the counts alternate which goes first, each
repeated), then from the cache the first read wrote, repeated.

    python benchmarks/folder_cache.py DIR [--threads 1,2] [--repeats 3] [--out benchmarks/results/folder-cache-cpu.json]
    python benchmarks/folder_cache.py DIR --photos 400 ...   # first write 400 camera-sized photos into DIR

DIR: train/<class>/ and test/<class>/ images, such as the CIFAR-10 proxy unpacked
(``tar xzf ../shared/data/cifar10-proxy.tar.gz -C DIR``: 32-pixel JPEGs), or with ``--photos N``
(DIR empty or new) N synthetic 1024x768 photos, a smooth gradient under noise: 3/4 JPEG (quality 85)
and 1/4 PNG, in two classes, a fifth of them test images. The cache file in DIR is removed before each
cold read.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_onecycle.image_folder import CACHE, load_folder


def write_photos(folder: Path, n: int) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder}: not empty; --photos writes into an empty or new folder")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 768 * 1024 * 3).reshape(768, 1024, 3)
    for i in range(n):
        split, label = ("test" if i % 10 < 2 else "train"), ("a", "b")[i % 2]
        pixels = (ramp * rng.uniform(0.5, 1.0) + rng.normal(0, 20, ramp.shape)).clip(0, 255).astype(np.uint8)
        path = folder / split / label / f"{i:05d}.{'png' if i % 4 == 3 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            Image.fromarray(pixels).save(path)
        else:
            Image.fromarray(pixels).save(path, quality=85)


def cold_read(folder: Path, threads: int) -> tuple[float, torch.Tensor]:
    (folder / CACHE).unlink(missing_ok=True)
    torch.set_num_threads(threads)  # load_images reads on torch's thread count
    t0 = time.perf_counter()
    data = load_folder(folder)
    return time.perf_counter() - t0, data.train_images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="thread counts, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--photos", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.photos:
        write_photos(args.folder, args.photos)
    counts = [int(t) for t in args.threads.split(",")]
    cold: dict[int, list[float]] = {t: [] for t in counts}
    first: torch.Tensor | None = None
    for repeat in range(args.repeats):
        for threads in counts if repeat % 2 == 0 else counts[::-1]:
            seconds, images = cold_read(args.folder, threads)
            cold[threads].append(round(seconds, 2))
            first = images if first is None else first
            assert torch.equal(images, first), "another thread count read other pixels"
    assert first is not None, "--repeats must be at least 1"
    warm = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        again = load_folder(args.folder)
        warm.append(time.perf_counter() - t0)
        assert torch.equal(again.train_images, first)
    data = load_folder(args.folder)
    result = {"images": len(data.train_images) + len(data.test_images), "classes": len(data.classes),
              "cold_seconds": {str(t): s for t, s in cold.items()},
              "cold_median_seconds": {str(t): round(statistics.median(s), 2) for t, s in cold.items()},
              "warm_seconds": [round(w, 2) for w in warm], "warm_median_seconds": round(statistics.median(warm), 2),
              "cache_bytes": (args.folder / CACHE).stat().st_size, "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "photos_written": args.photos}
    if len(counts) > 1:  # each repeat's ratio against the first count, and their spread
        ratios = [b / a for a, b in zip(cold[counts[0]], cold[counts[-1]], strict=True)]
        result[f"cold_ratio_{counts[-1]}_to_{counts[0]}_threads"] = [round(r, 3) for r in ratios]
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
