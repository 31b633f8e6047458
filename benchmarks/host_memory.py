"""A CPU run with its freed memory kept (``host_memory.freed_memory_kept``, as ``train`` does) against
the same run on glibc's default malloc, and optionally against tcmalloc put in front of it.

Each side is a fresh process (malloc's state is the process's) that trains a 2-epoch run of the
`seed` recipe's batch on random pixels and labels through ``cifar_onecycle.train`` and reports the
second epoch's training pass (the first warms up), its final training loss and its peak resident
memory. The sides alternate, round after round, the first side of a round turning with the round,
so that drift in a shared machine's speed reaches each side; a round's ratio is the kept side's
images a second over the default side's.

    python benchmarks/host_memory.py [--rounds 5] [--steps 8] [--precision auto] [--tcmalloc PATH]

``--tcmalloc PATH`` (say /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4) adds a side run under
``LD_PRELOAD=PATH``. Prints every process and the median ratio with its spread (min to max), and
writes them as JSON, with the commit, torch version, CPU model and precision, to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES = ("default", "kept")


def child(side: str, steps: int, precision: str) -> None:
    """One side's run, its numbers as one JSON line on stdout."""
    from cifar_onecycle import train, training
    from throughput import random_run

    if side != "kept":  # glibc's own behaviour, or the preloaded allocator's
        training.freed_memory_kept = contextlib.nullcontext  # type: ignore[assignment]
    recipe, data = random_run(steps, 512, device="cpu", precision=precision)
    result = train(recipe, data=data, progress=False, report=False)
    last = result.history[-1]
    print(json.dumps({"side": side, "images_per_second": last.images_per_second,
                      "first_epoch_images_per_second": result.history[0].images_per_second,
                      "train_loss": last.train_loss,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_side(side: str, steps: int, precision: str, tcmalloc: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    if side == "tcmalloc":
        env["LD_PRELOAD"] = tcmalloc or ""
    out = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(steps), "--precision", precision],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each side once a round (at least 5)")
    ap.add_argument("--steps", type=int, default=8, help="steps of 512 an epoch")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--tcmalloc", help="a tcmalloc library to preload for a third side")
    ap.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/"
                    "host-memory-cpu-PRECISION.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.steps, a.precision)
        return
    if a.rounds < 5:
        raise SystemExit("host_memory: --rounds must be at least 5")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    from cifar_onecycle.device import resolve_precision
    from cifar_onecycle.results import git_commit
    from throughput import cpu_model

    precision = resolve_precision(a.precision, torch.device("cpu"))
    sides = SIDES + (("tcmalloc",) if a.tcmalloc else ())
    print(f"{cpu_model()}, precision {precision}, {a.steps} steps of 512 an epoch, {a.rounds} rounds of {sides}",
          flush=True)
    started = time.perf_counter()
    rows = []
    for r in range(a.rounds):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            row = run_side(side, a.steps, precision, a.tcmalloc) | {"round": r}
            rows.append(row)
            print(f"round {r} {side:8} {row['images_per_second']:7.1f} images/s, loss {row['train_loss']:.6f}, "
                  f"peak {row['peak_rss_mb']:.0f} MB", flush=True)

    def of(side: str, key: str) -> list[float]:
        return [row[key] for row in sorted(rows, key=lambda row: row["round"]) if row["side"] == side]

    result: dict = {"commit": git_commit(), "torch": torch.__version__, "cpu": cpu_model(),
                    "python": platform.python_version(), "precision": precision, "steps": a.steps,
                    "rounds": a.rounds, "seconds": round(time.perf_counter() - started, 1), "runs": rows,
                    "same_loss": len({row["train_loss"] for row in rows}) == 1}
    for side in sides[1:]:
        ratios = [s / d for s, d in zip(of(side, "images_per_second"), of("default", "images_per_second"), strict=True)]
        memory = [s / d for s, d in zip(of(side, "peak_rss_mb"), of("default", "peak_rss_mb"), strict=True)]
        result[side] = {"speed_ratio_median": statistics.median(ratios), "speed_ratio_min": min(ratios),
                        "speed_ratio_max": max(ratios), "peak_memory_ratio_median": statistics.median(memory)}
        print(f"{side} / default: images a second x{statistics.median(ratios):.3f} "
              f"({min(ratios):.3f} to {max(ratios):.3f}), peak memory x{statistics.median(memory):.2f}")
    print("every run's final training loss the same:", result["same_loss"])
    out = a.out or Path(__file__).parent / "results" / f"host-memory-cpu-{precision}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
