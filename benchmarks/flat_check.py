"""Time and memory of a recipe file's structure check on long array lines (``recipe.check_flat``),
crafted to make a backtracking matcher work hardest: each line is as long as ``--megabytes``, the most
a recipe file may hold being 16 MB. Memory is the peak that tracemalloc sees (re's backtracking records
included); time is the best of ``--repeats``, measured with tracemalloc off.

    python benchmarks/flat_check.py [--megabytes 16] [--out benchmarks/results/flat-check-cpu-py3.11.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

from cifar_onecycle import RecipeError
from cifar_onecycle.recipe import check_flat


def lines(n: int) -> dict[str, str]:
    return {
        "numbers, then a bad item": "k = [" + "1," * (n // 2) + "x]",
        "40-digit numbers, then a bad item": "k = [" + ("9" * 40 + ",") * (n // 41) + "x]",
        "short strings, then a bad item": "k = [" + '"a",' * (n // 4) + "x]",
        "strings of 255 escapes, then a bad item": "k = [" + ('"' + "\\a" * 255 + '",') * (n // 513) + "x]",
        "one long string, then no comma": 'k = ["' + "a" * n + '" "b"]',
        "spaces, then a bad item": "k = [1" + " " * n + "x]",
        "numbers (passes)": "k = [" + "1," * (n // 2) + "1]",
        "strings and a comment (passes)": "k = [" + '"ab", ' * (n // 6) + '"a"]  # a, "b", ]',
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--megabytes", type=float, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for name, line in lines(int(args.megabytes * 1e6)).items():
        tracemalloc.start()
        try:
            check_flat(line, "crafted")
            passed = True
        except RecipeError:
            passed = False
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with contextlib.suppress(RecipeError):
                check_flat(line, "crafted")
            seconds.append(time.perf_counter() - t0)
        rows.append({"line": name, "megabytes": round(len(line) / 1e6, 2), "passes": passed,
                     "seconds": round(min(seconds), 3), "peak_mb": round(peak / 1e6, 2)})
        print(f"{name:42s} {rows[-1]['megabytes']:6.2f} MB  {'passes' if passed else 'refused':7s} "
              f"{rows[-1]['seconds']:6.3f} s  peak {rows[-1]['peak_mb']:6.2f} MB", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"python": sys.version.split()[0], "cpu": platform.processor() or
                                        platform.machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
