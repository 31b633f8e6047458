"""Does a sweep end sooner with 2 workers than with 1 on this machine? The same small sweep, timed
with each, alternating which goes first, repeated; the ratio (2 workers / 1) with its spread.

    python benchmarks/sweep_workers.py --data-dir DIR --out FILE.json [--repeats 2] \\
        [--sweep "--recipe seed --vary lr_max=0.1,0.2 --seeds 2 --epochs 1 --train-subset 5120"]

Each timing is the whole ``cifar-onecycle sweep`` command, start-up and data loading included: what
a user waits for. On a CPU each of 2 workers gets half the cores (``sweep.worker_environment``); on
a GPU both share it.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_sweep(args: list[str], workers: int, data_dir: Path) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"sweep-workers{workers}-"))
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cifar_onecycle", "sweep", *args, "--workers", str(workers),
                        "--data-dir", str(data_dir), "--no-download", "--no-checkpoint", "--quiet",
                        "--out", str(out / "sweep")], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="the JSON file of the timings")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sweep", default="--recipe seed --vary lr_max=0.1,0.2 --seeds 2 --epochs 1 --train-subset 5120",
                    help="the sweep's flags, the same for both")
    args = ap.parse_args()
    sweep_flags = shlex.split(args.sweep)
    walls: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(args.repeats):
        for workers in ((1, 2) if repeat % 2 == 0 else (2, 1)):
            walls[workers].append(round(timed_sweep(sweep_flags, workers, args.data_dir), 2))
            print(f"repeat {repeat}: {workers} worker(s) {walls[workers][-1]:.1f} s", flush=True)
    ratios = [two / one for one, two in zip(walls[1], walls[2], strict=True)]
    result = {"sweep": args.sweep, "machine": platform.processor() or platform.machine(),
              "wall_seconds": walls, "two_over_one": [round(r, 3) for r in ratios],
              "two_over_one_median": round(statistics.median(ratios), 3)}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"2 workers / 1: median {result['two_over_one_median']}, each {result['two_over_one']}")


if __name__ == "__main__":
    main()
