"""The one prepared command for a lent GPU machine: every stage capped by a time budget, every
result written to ``--out`` as soon as it exists, so a command cut short still returns what finished.

    PYTHONPATH=src python benchmarks/device_run.py --out $OUT --budget-s 520 --commit SHA \\
        --proxy-tar .gpu/cifar10-proxy.tar.gz --proxy-tool .gpu/cifar10_proxy.py --wheels .gpu

Stages, in order:

1. ``smoke``: the environment (torch, card, driver, bf16) into env.json; wheels carried along for
   what the machine lacks (torchinfo) installed into a temporary folder; the proxy data built from
   the carried tar; then a two-epoch eager run on the device, so that a broken CUDA path fails in
   seconds and the second epoch times a steady epoch for the plan.
2. ``accuracy``: the shipped recipes (``seed``, ``dawnbench``, ``best``) at 24 epochs, eager,
   interleaved by seed (seed 0 of each, then seed 1 of each, ...), so that a cut leaves the recipes
   measured over the same seeds. It stops when the next run would not finish before the time kept
   for the later stages (``--reserve-s``).
3. ``compiled``: the ``seed`` recipe with ``torch.compile`` (default mode); the first epoch's extra
   time over the median epoch is reported as compilation and warm-up, apart from the training
   time. Then the bare step (forward, backward, SGD on one fixed batch), eager and compiled, for the
   ratio whole loop / bare step.
4. ``profile``: the top CUDA kernels of 10 bare steps by time, eager and compiled, and the
   achieved TFLOP/s.
5. ``lr_points``: the ``seed`` recipe at fixed LRMAX values (``--lr-points``) over
   ``--lr-point-seeds`` seeds, as one ``cifar-onecycle sweep`` run as the ``sweeps`` stage runs its
   (below); a diverging run is recorded as such and the sweep goes on.

``lr_find`` and ``lr_auto`` (not in the default list): the default LR range test of the ``seed``
and ``dawnbench`` recipes (both sweeps; graphs and lr_find.json packed as
``lr_find/<recipe>/seed0/``), then the ``seed`` recipe trained at the linear sweep's LRMAX, and at
its LRMAX and LRMIN, two seeds each.

``sweeps``, ``workers`` and ``torchrun`` (not in the default list): the product's own commands, each
in its own process, its output in a ``.log`` beside its folder. ``sweeps`` runs the
``cifar-onecycle sweep`` commands of a plan file (``--sweeps``, default ``benchmarks/sweeps/lr.txt``),
packs each run as it ends, stops a sweep with SIGINT (its clean stop) when its next run would end
after the budget, and goes on where an earlier call stopped (on the same machine, or from
``--sweeps-from``); its sweeps take ``--sweep-workers``. ``workers``: one small sweep with 1 worker and
with 2 sharing the GPU, timed; the faster count is kept on the machine for the sweeps stage (run it first).
``torchrun``: two epochs under ``torchrun --nproc-per-node 1`` with ``--sync-bn`` and a holdout.
``fp16``: the ``seed`` recipe in fp16 (loss scaling: a T4's path) with the sweeps' holdout, seed 0.
``best2`` (after ``sweeps`` with ``best-stage1.txt``) and ``final``: stage 2 of `best`'s selection
and its final comparison, each derived from the ended sweep before it (``stage1``, ``stage2``) by
``best_selection.py``'s rules and run as the sweep ``stage2`` or ``final``.

``speed`` (not in the default list): the speed levers on the bare step (fused SGD, cuDNN's
benchmark mode, torch.compile's modes; ``--bare-variants`` picks them), the augmentation alone (one
batch at a time, and as the library does it), and the whole loop eager and with CUDA graphs, with
the library's CUDA defaults and with one batch augmented at a time.

No run folder is written into ``--out``. Runs go to ``--work`` (no checkpoints, no report: a run
costs its training and evaluation only); after each one ``runs.tar.gz`` in ``--out`` is rewritten
(atomically) with the ``recipe.toml``, ``metrics.csv`` and ``summary.json`` of every finished run as
``gpu-<card>/<stage>/<recipe>/seed<k>/``. Beside it: ``progress.jsonl`` (a line per finished run),
``timing.json``, ``env.json``, ``profile.json`` and ``log.txt`` (everything printed).

Dry run on a CPU, tiny settings (minutes)::

    python benchmarks/device_run.py --out /tmp/dr-out --work /tmp/dr-work --data-dir DIR --budget-s 900 \\
        --seeds 1 --test-subset 500 --set epochs=1 --set peak_epoch=0.5 --set train_subset=1024 \\
        --set batch_size=256 --lr-points 0.05,0.1 --bare-steps 2

``benchmarks/device_report.py`` turns the unpacked files into the results folder's README.md.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECIPES = ("seed", "dawnbench", "best")
# What comes back of a run folder (a diverged run has diverged.json instead of summary.json; a
# range test has lr_find.json and its graphs).
PACKED = ("recipe.toml", "metrics.csv", "summary.json", "diverged.json", "failed.json", "lr_find.json",
          # a sweep's own files, and the output of a command this script ran (``run_cli``)
          "sweep.csv", "sweep.json", "sweep.png", "sweep_curves.png", "sweep.md", "sweep_plan.json", "seeds.json",
          "seeds.md")


# The workers stage's choice, in --work (kept by later calls): two workers on one GPU when they end its sweep in at
# most 0.9 of one worker's time (one timing each, so a smaller gain is not told from noise).
WORKERS_CHOICE = "workers_chosen.json"
TWO_WORKERS_AT_MOST = 0.9


class Tee(io.TextIOBase):
    """Everything printed goes to the terminal and to log.txt, flushed at once."""

    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def ensure_packages(wheels: Path | None) -> str:
    """Install carried wheels for what this Python lacks (the GPU image has no torchinfo)."""
    try:
        importlib.import_module("torchinfo")
        return "torchinfo present"
    except ImportError:
        pass
    found = sorted(wheels.glob("*.whl")) if wheels else []
    if not found:
        raise SystemExit("device_run: torchinfo is missing and no wheels were given; carry its wheel and pass --wheels")
    target = Path(tempfile.gettempdir()) / "device_run_site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", str(target), *map(str, found)], check=True)
    sys.path.insert(0, str(target))
    # the commands this script starts (run_cli) need it too
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    importlib.import_module("torchinfo")
    return f"installed {', '.join(w.name for w in found)}"


def environment(commit: str | None, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    path, command = os.environ.get("PYTHONPATH"), shlex.join(["python3", *sys.argv])  # for the results page
    env: dict[str, Any] = {
        "commit": commit, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": f"PYTHONPATH={shlex.quote(path)} {command}" if path else command,
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "args": vars(args) | {
            k: str(v) for k, v in vars(args).items() if isinstance(v, Path)},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"card": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
                "memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
                "bf16": torch.cuda.is_bf16_supported()}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    return env


def card_slug(card: str | None) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'; 'cpu' without a GPU."""
    if not card:
        return "cpu"
    name = card.lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


class Results:
    """The files that come back: rewritten whole (atomically) after every run."""

    def __init__(self, out: Path, runs: Path, name: str) -> None:
        self.out, self.runs, self.name = out, runs, name
        self.timing: dict[str, Any] = {}

    def write(self, name: str, data: bytes | str) -> None:
        from cifar_onecycle.files import atomic_write

        atomic_write(self.out / name, data)

    def add_run(self, record: dict[str, Any]) -> None:
        with open(self.out / "progress.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.pack()

    def set_timing(self, key: str, value: Any) -> None:
        self.timing[key] = value
        self.write("timing.json", json.dumps(self.timing, indent=2) + "\n")

    def pack(self) -> None:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(p for p in self.runs.rglob("*") if p.is_file()):
                if (path.name in PACKED or path.name.startswith("lr_find_") and path.suffix == ".png"
                        or path.suffix == ".log"):
                    tar.add(path, arcname=f"{self.name}/{path.relative_to(self.runs)}")
        self.write("runs.tar.gz", buffer.getvalue())


class Clock:
    """The command's budget: one deadline, and per-run estimates that later runs correct."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.estimates: dict[str, float] = {}

    def left(self, reserve: float = 0.0) -> float:
        return self.deadline - reserve - time.perf_counter()

    def fits(self, key: str, reserve: float = 0.0) -> bool:
        return self.estimates.get(key, 0.0) <= self.left(reserve)


def run_one(stage: str, name: str, recipe: Any, data: Any, data_dir: Path, results: Results,
            clock: Clock, estimate: str | None = None, augment_images: int | None = None) -> dict[str, Any]:
    """Train one run into the work folder and record it; a diverging run is recorded, not raised.
    ``estimate``: the key of the clock's estimate that this run's time corrects (default ``name``);
    ``augment_images``: ``train``'s (None: the library's choice)."""
    estimate = estimate or name
    import torch

    from cifar_onecycle import DivergenceError, train
    from cifar_onecycle.device import synchronize
    from cifar_onecycle.files import atomic_write

    run_dir = results.runs / stage / name / f"seed{recipe.seed}"
    say(f"{stage}: {name} seed {recipe.seed} (estimate {clock.estimates.get(estimate, float('nan')):.0f} s, "
        f"{clock.left():.0f} s left in the budget)")
    record: dict[str, Any] = {"stage": stage, "recipe": name, "seed": recipe.seed, "lr_max": recipe.lr_max,
                              "epochs": recipe.epochs, "compile": recipe.compile}
    started = time.perf_counter()
    try:
        result = train(recipe, data=data, data_dir=data_dir, download=False, out=run_dir, overwrite=True,
                       progress=False, report=False, checkpoints=False, augment_images=augment_images)
    except DivergenceError as e:
        record |= {"status": "diverged", "message": str(e), "wall_seconds": round(time.perf_counter() - started, 2)}
        atomic_write(run_dir / "diverged.json", json.dumps(record, indent=2) + "\n")
        say(f"  diverged: {e}")
        results.add_run(record)
        return record
    synchronize(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    wall = time.perf_counter() - started
    summary, history = result.summary, result.history
    epoch_seconds = [h.train_seconds for h in history]
    record |= {"status": "ok", "final_test_acc": summary["final_test_acc"],
               "final_test_acc_tta": summary["final_test_acc_tta"],
               "final_test_acc_without_ema": summary["final_test_acc_without_ema"],
               "train_seconds": round(sum(epoch_seconds), 3), "wall_seconds": round(wall, 2),
               "epoch_train_seconds": [round(s, 4) for s in epoch_seconds],
               "images_per_epoch": summary["steps_per_epoch"] * recipe.batch_size,
               "images_per_second_median": statistics.median(h.images_per_second for h in history)}
    say(f"  test acc {summary['final_test_acc']:.2%} (flip TTA {summary['final_test_acc_tta']:.2%}), "
        f"train {sum(epoch_seconds):.1f} s, wall {wall:.1f} s")
    clock.estimates[estimate] = max(clock.estimates.get(estimate, 0.0) * 0.5, wall * 1.05)
    results.add_run(record)
    return record


def stage_smoke(recipe_for: Callable[[str], Any], data: Any, data_dir: Path, results: Results,
                clock: Clock, epochs: int) -> None:
    """Two eager epochs of dawnbench (its small logits make a short run safe at any LR); the second
    epoch's time and the evaluation's give the plan's estimates."""
    recipe = recipe_for("dawnbench").replace(epochs=min(2, epochs), peak_epoch=min(2, epochs) / 4)
    record = run_one("smoke", "dawnbench", recipe, data, data_dir, results, clock)
    if record["status"] != "ok":
        raise SystemExit("device_run: the smoke run diverged; nothing else would be worth measuring")
    epoch_train = record["epoch_train_seconds"][-1]
    # the rest of the wall clock: setup, each epoch's evaluation, the two final TTA passes
    per_eval = (record["wall_seconds"] - record["train_seconds"]) / (recipe.epochs + 2)
    results.set_timing("smoke", {"epoch_train_seconds": record["epoch_train_seconds"],
                                 "wall_seconds": record["wall_seconds"], "eval_seconds_estimate": per_eval})
    plan = []
    for name in RECIPES:
        r = recipe_for(name)
        passes = r.epochs * (3 if r.tta else 1) + 3  # per-epoch evaluation (+ TTA: two forwards) and the final ones
        clock.estimates[name] = 1.15 * (r.epochs * epoch_train + passes * per_eval)
        plan.append(f"{name} {clock.estimates[name]:.0f} s")
    say(f"plan: one {recipe_for('seed').epochs}-epoch run of each: {', '.join(plan)}")


def stage_accuracy(recipe_for: Callable[[str], Any], seeds: int, data: Any, data_dir: Path, results: Results,
                   clock: Clock, reserve: float) -> None:
    for seed in range(seeds):
        for name in RECIPES:
            if not clock.fits(name, reserve):
                say(f"accuracy: stopped before {name} seed {seed}: {clock.left(reserve):.0f} s left before the "
                    f"{reserve:.0f} s kept for the later stages")
                return
            run_one("accuracy", name, recipe_for(name).replace(seed=seed), data, data_dir, results, clock)


def run_timing(record: dict[str, Any]) -> dict[str, Any]:
    """A run's training time with the first epoch's extra cost (compilation, cuDNN's benchmark,
    allocator warm-up) apart: the first epoch minus the median of the others."""
    epochs = record["epoch_train_seconds"]
    steady = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
    return {
        "train_seconds_total": record["train_seconds"],
        "first_epoch_seconds": epochs[0], "median_epoch_seconds": steady,
        "compile_and_warmup_seconds": epochs[0] - steady,
        # the run's training time without its compilation: the first epoch counted at the median's cost
        "train_seconds_without_compile": sum(epochs[1:]) + steady,
        "wall_seconds": record["wall_seconds"], "final_test_acc": record["final_test_acc"],
        # the median epoch's speed: the first epoch, which compiles, does not count
        "whole_loop_images_per_second_median": record["images_per_epoch"] / steady,
    }


# The bare-step variants of the speed stage: (label, recipe changes, fused SGD, cuDNN benchmark
# mode). The first is the step as the loop ran it before the speed work. Measured once and not run
# again: max-autotune-no-cudagraphs, 92,900 images a second after 157 s of autotuning on an H200,
# slower than eager (benchmarks/results/gpu-h200-levers/).
BARE_VARIANTS: tuple[tuple[str, dict[str, Any], bool, bool], ...] = (
    ("eager, for-each SGD, cuDNN heuristics", {}, False, False),
    ("eager, fused SGD, cuDNN heuristics", {}, True, False),
    ("eager, for-each SGD, cuDNN benchmark", {}, False, True),
    ("eager, fused SGD, cuDNN benchmark", {}, True, True),
    ("compiled, fused SGD, cuDNN heuristics", {"compile": True}, True, False),
    ("compiled reduce-overhead, fused SGD, cuDNN heuristics",
     {"compile": True, "compile_mode": "reduce-overhead"}, True, False),
)
# The whole-loop variants, with the library's own choices on CUDA (fused SGD, cuDNN's heuristics,
# one host sync an epoch, GPU_AUGMENT_IMAGES augmented at once): (label, recipe changes, the bare
# variant that runs the same step, images augmented at once: None for the library's choice, 0 for
# one batch at a time as before). Measured once and not run again: compile's default mode, slower
# than eager (73,300 against 77,900 images a second on an H200, benchmarks/results/gpu-h200-levers/).
LOOP_VARIANTS: tuple[tuple[str, dict[str, Any], str, int | None], ...] = (
    ("eager", {}, "eager, fused SGD, cuDNN heuristics", None),
    ("compiled-reduce-overhead", {"compile": True, "compile_mode": "reduce-overhead"},
     "compiled reduce-overhead, fused SGD, cuDNN heuristics", None),
    ("compiled-reduce-overhead, one batch augmented at a time", {"compile": True, "compile_mode": "reduce-overhead"},
     "compiled reduce-overhead, fused SGD, cuDNN heuristics", 0),
)


def stage_speed(recipe_for: Callable[[str], Any], data: Any, data_dir: Path, results: Results, clock: Clock,
                bare_steps: int, reserve: float, bare_variants: list[int]) -> None:
    """The chosen levers on the bare step (``bare_variants``: indices into BARE_VARIANTS), the
    augmentation alone (one batch at a time, and as the library does it), then the whole loop in
    each mode."""
    import torch

    from cifar_onecycle.device import synchronize
    from cifar_onecycle.run_setup import setup_run
    from throughput import bare_images_per_second

    base = recipe_for("seed")
    speed: dict[str, Any] = {"bare": [], "loops": []}
    for label, changes, fused, benchmark in [BARE_VARIANTS[i] for i in bare_variants]:
        if clock.left(reserve) < 60:
            say(f"speed: bare variants stopped before '{label}', {clock.left(reserve):.0f} s left")
            break
        torch.backends.cudnn.benchmark = benchmark
        started = time.perf_counter()
        rates = bare_images_per_second(base.replace(**changes), bare_steps, blocks=5, warmup=3, fused=fused)
        speed["bare"].append({"variant": label, "images_per_second": rates, "median": statistics.median(rates),
                              "seconds_with_warmup": round(time.perf_counter() - started, 2)})
        say(f"  bare {label}: median {statistics.median(rates):.0f} img/s")
        results.set_timing("speed", speed)

    torch.backends.cudnn.benchmark = False  # the library's setting, for everything below
    # The augmentation alone: an epoch's batches (shuffle, draws, gather, crop, flip, normalise,
    # CutOut), one batch at a time (as before) and as the library does it on this device.
    for key, images in (("augmentation_epoch_seconds_one_batch_at_a_time", 0),
                        ("augmentation_epoch_seconds", None)):
        run = setup_run(base, data, augment_images=images)
        seconds = []
        for _ in range(3):
            synchronize(run.device)
            started = time.perf_counter()
            for _batch in run.epoch():
                pass
            synchronize(run.device)
            seconds.append(time.perf_counter() - started)
        speed[key] = seconds
        say(f"  {key.replace('_', ' ')}: {', '.join(f'{t:.4f}' for t in seconds)} s")
    del run
    results.set_timing("speed", speed)

    for label, changes, bare_variant, images in LOOP_VARIANTS:
        key = f"seed-{label.split(',')[0]}" + ("-one-batch-augmented" if images == 0 else "")
        clock.estimates[key] = clock.estimates["seed"] + (60 if changes else 0)
        if not clock.fits(key, reserve):
            say(f"speed: loop '{label}' skipped, {clock.left(reserve):.0f} s left")
            continue
        record = run_one("speed", key, base.replace(**changes), data, data_dir, results, clock, augment_images=images)
        if record["status"] == "ok":
            speed["loops"].append({"variant": label, "bare_variant": bare_variant} | run_timing(record))
            bare = [b["median"] for b in speed["bare"] if b["variant"] == bare_variant]
            if bare:
                speed["loops"][-1]["ratio_whole_over_bare"] = (
                    speed["loops"][-1]["whole_loop_images_per_second_median"] / bare[0])
                say(f"  whole loop / bare step: {speed['loops'][-1]['ratio_whole_over_bare']:.3f}")
            results.set_timing("speed", speed)
    # the fastest loop with the library's augmentation again with seed 1, for its accuracy
    candidates = [loop for loop in speed["loops"] if loop["variant"] != "eager" and "one batch" not in loop["variant"]]
    if candidates:
        fastest = min(candidates, key=lambda loop: loop["train_seconds_without_compile"])
        key = f"seed-{fastest['variant']}"
        if clock.fits(key, reserve):
            changes = next(c for name, c, _, _ in LOOP_VARIANTS if name == fastest["variant"])
            run_one("speed", key, base.replace(**changes, seed=1), data, data_dir, results, clock)


def stage_lr_find(recipe_for: Callable[[str], Any], data: Any, results: Results,
                  found: dict[str, Any]) -> None:
    """The default range test (both sweeps) of the seed and dawnbench recipes; the seed recipe's
    suggestions, each from the sweep ``--lr-max auto`` and ``--lr-min auto`` read it from, go into
    ``found`` for ``stage_lr_auto``."""
    from cifar_onecycle.lr_finder import AUTO_SWEEPS, MODES, lr_range_test, write_lr_find

    for name in ("seed", "dawnbench"):
        started = time.perf_counter()
        sweeps = lr_range_test(recipe_for(name), data, MODES, progress=False)
        seconds = time.perf_counter() - started
        write_lr_find(sweeps, results.runs / "lr_find" / name / "seed0")
        record: dict[str, Any] = {"stage": "lr_find", "recipe": name, "seconds": round(seconds, 2)}
        for mode, sweep in sweeps.items():
            record[mode] = {"lr_max": sweep.suggested_lr_max, "lr_min": sweep.suggested_lr_min,
                            "lr_max_rule": sweep.lr_max_rule, "lr_min_rule": sweep.lr_min_rule,
                            "iterations": len(sweep.lrs), "stopped": sweep.stopped, "note": sweep.note}
            say(f"lr_find {name} {mode}: LRMAX {sweep.suggested_lr_max} LRMIN {sweep.suggested_lr_min} over "
                f"{len(sweep.lrs)} iterations; {sweep.stopped or ''} {sweep.note or ''}")
        results.add_run(record)
        if name == "seed":
            found.update({setting: record[mode][setting] for setting, mode in AUTO_SWEEPS.items()},
                         note=record["linear"]["note"])


def stage_lr_auto(recipe_for: Callable[[str], Any], data: Any, data_dir: Path, results: Results, clock: Clock,
                  found: dict[str, Any], seeds: int = 2) -> None:
    """The seed recipe trained with the range test's LRMAX (LRMIN as the recipe's), then with its
    LRMAX and LRMIN, ``seeds`` seeds each: what ``--lr-max auto`` and ``--lr-min auto`` would train."""
    if found.get("lr_max") is None:
        say(f"lr_auto: skipped, the range test suggested no LRMAX ({found.get('note')})")
        return
    variants = [("seed-lrmax-found", {"lr_max": found["lr_max"]})]
    if found.get("lr_min") is not None:
        variants.append(("seed-lrmax-lrmin-found", {"lr_max": found["lr_max"], "lr_min": found["lr_min"]}))
    for name, changes in variants:  # the LRMAX alone first: what --lr-max auto trains, over both seeds
        for seed in range(seeds):
            if not clock.fits("seed"):
                say("lr_auto: stopped, the budget is spent")
                return
            run_one("lr_auto", name, recipe_for("seed").replace(**changes, seed=seed), data, data_dir, results, clock,
                    estimate="seed")


def stage_lr_points(extra: list[str], data_dir: Path, results: Results, clock: Clock, lrs: str, seeds: int) -> None:
    """The ``seed`` recipe at fixed LRMAX values over ``seeds`` seeds: one ``cifar-onecycle sweep``
    in ``runs/lr_points`` (diverged runs recorded as such), as the sweeps stage runs one."""
    run_cli("lr_points", "seed", sweep_args(["--recipe", "seed", "--vary", f"lr_max={lrs}", "--seeds", str(seeds),
                                             *extra], data_dir), results, clock, folder=results.runs / "lr_points")


def stage_compiled(recipe_for: Callable[[str], Any], data: Any, data_dir: Path, results: Results, clock: Clock,
                   bare_steps: int, reserve: float) -> None:
    from throughput import bare_images_per_second

    recipe = recipe_for("seed").replace(compile=True)
    # compilation costs about a minute on top of an eager-speed run (a guess until measured)
    clock.estimates["seed-compiled"] = clock.estimates["seed"] + 60
    if not clock.fits("seed-compiled", reserve):
        say(f"compiled: skipped, {clock.left(reserve):.0f} s left")
        return
    record = run_one("compiled", "seed", recipe, data, data_dir, results, clock, estimate="seed-compiled")
    if record["status"] != "ok":
        return
    timing = run_timing(record)
    results.set_timing("compiled_seed", timing)
    if clock.left(reserve) < 30:
        say("compiled: no time left for the bare step")
        return
    for label, compiled in (("eager", False), ("compiled", True)):
        bare_recipe = recipe.replace(compile=compiled)
        rates = bare_images_per_second(bare_recipe, bare_steps, blocks=3, warmup=3)
        timing[f"bare_{label}_images_per_second"] = rates
        say(f"  bare {label} step: {', '.join(f'{r:.0f}' for r in rates)} img/s")
    bare = statistics.median(timing["bare_compiled_images_per_second"])
    timing["ratio_whole_over_bare_compiled"] = timing["whole_loop_images_per_second_median"] / bare
    say(f"  whole loop / bare compiled step: {timing['ratio_whole_over_bare_compiled']:.3f}")
    results.set_timing("compiled_seed", timing)


def stage_profile(recipe_for: Callable[[str], Any], results: Results, steps: int = 10) -> None:
    """The top kernels of ``steps`` bare steps, eager and compiled (the library's CUDA defaults:
    fused SGD, cuDNN heuristics), and the achieved TFLOP/s over the kernels' time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cifar_onecycle import ResNet9
    from cifar_onecycle.device import resolve_device, resolve_precision, synchronize
    from cifar_onecycle.model import training_flops_per_image
    from throughput import bare_step

    recipe = recipe_for("seed")
    device = resolve_device(recipe.device)
    on_gpu = device.type == "cuda"
    torch.backends.cudnn.benchmark = False  # the library's setting
    flops = training_flops_per_image(ResNet9().to(device))
    reports: dict[str, Any] = {}
    for label, changes in (("eager", {}), ("compiled", {"compile": True})):
        step = bare_step(recipe.replace(**changes))
        for _ in range(3):
            step()
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            synchronize(device)
        wall = time.perf_counter() - started
        wanted = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
        rows = []
        for event in prof.key_averages():
            if event.device_type != wanted:
                continue
            own = getattr(event, "self_device_time_total", None) if on_gpu else event.self_cpu_time_total
            if own is None:
                own = getattr(event, "self_cuda_time_total", 0.0)
            rows.append({"name": event.key[:160], "calls": event.count, "self_us": own})
        rows.sort(key=lambda r: -r["self_us"])
        device_us = sum(r["self_us"] for r in rows)
        images = steps * recipe.batch_size
        reports[label] = {
            "steps": steps, "batch_size": recipe.batch_size, "precision": resolve_precision(recipe.precision, device),
            "training_gflop_per_image": flops / 1e9, "wall_seconds_profiled": wall,
            "kernel_seconds": device_us / 1e6 if on_gpu else None,
            "achieved_tflops_wall": flops * images / wall / 1e12,
            "achieved_tflops_kernels": flops * images / (device_us / 1e6) / 1e12 if on_gpu and device_us else None,
            "top": [r | {"share": r["self_us"] / device_us if device_us else None} for r in rows[:25]]}
        say(f"profile {label}: {reports[label]['achieved_tflops_wall']:.0f} TFLOP/s over the wall clock "
            f"(profiler on); top kernel: {rows[0]['name'][:80] if rows else 'none'}")
        results.write("profile.json", json.dumps(reports, indent=2) + "\n")


def read_sweep_plan(path: Path) -> list[tuple[str, list[str]]]:
    """The sweeps of a plan file (``benchmarks/sweeps/*.txt``): one a line, its name and then its
    ``cifar-onecycle sweep`` flags; ``#`` starts a comment; a line ending in a backslash goes on on
    the next."""
    plan = []
    for line in path.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].startswith("-"):  # a continued line cut short
            raise SystemExit(f"{path}: {line.strip()[:60]!r}...: a sweep's line starts with its name")
        if words:
            plan.append((words[0], words[1:]))
    return plan


def set_flags(texts: list[str]) -> list[str]:
    """``--set KEY=VALUE`` as the command line's flags, for the commands this script starts."""
    from recipes import setting

    flags: list[str] = []
    for key, value in (setting(text) for text in texts):
        flag = "--" + key.replace("_", "-")
        flags += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return flags


def sweep_rows(folder: Path) -> list[dict[str, str]]:
    try:
        with open(folder / "sweep.csv", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def sweep_size(folder: Path) -> int:
    """How many runs the sweep in ``folder`` has, ended or not."""
    from cifar_onecycle.sweep import SweepFolder

    return len(SweepFolder(folder).read()[0].runs())


def sweep_args(args: list[str], data_dir: Path) -> list[str]:
    """``cifar-onecycle sweep ARGS`` as this script runs every sweep: on the built data, no
    checkpoints (a run cut short starts again), no progress bars."""
    return ["sweep", *args, "--data-dir", str(data_dir), "--no-download", "--no-checkpoint", "--quiet"]


def run_cli(stage: str, name: str, args: list[str], results: Results, clock: Clock,
            folder: Path | None = None, workers: int = 1) -> dict[str, Any]:
    """``python -m cifar_onecycle ARGS`` (a sweep, or a command such as torchrun's given whole in
    ``args`` from ``-m``) with its output in ``FOLDER.log``. A sweep's folder is ``folder`` (default
    ``runs/STAGE/NAME``); each run it finishes is recorded and packed at once, and it is stopped with
    SIGINT (its clean stop) when the next run would end after the budget, or at the budget's end.
    ``workers``: the sweep's ``--workers``, runs that end in turn. Returns the record: exit code,
    wall seconds, runs finished."""
    folder = folder or results.runs / stage / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *(args if args[0] == "-m" else ["-m", "cifar_onecycle", *args])]
    is_sweep = args[0] == "sweep"
    if is_sweep:
        command += ["--out", str(folder)]
    say(f"{stage}: {name}: {shlex.join(command[1:])} ({clock.left():.0f} s left in the budget)")
    started = time.perf_counter()
    ends = [started]  # when each run ended (the first entry: the sweep's start)
    # rows of an earlier call on this machine are not news: a sweep goes on where it stopped
    seen = {tuple(row.items()) for row in sweep_rows(folder)}
    size: int | None = None  # the sweep's runs, read from its plan once it has written one
    stopped_at = None
    with open(folder.parent / f"{folder.name}.log", "a", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(1)
            rows = sweep_rows(folder) if is_sweep else []
            ended = [r for r in rows if tuple(r.items()) not in seen]  # with workers, not in row order
            for row in ended:
                seen.add(tuple(row.items()))
                if not row.get("weights_from"):  # not a run evaluated with another's weights: seconds, not a training
                    ends.append(time.perf_counter())
                    # A run lasts the time ``workers`` runs take to end in turn (the first ones: since the
                    # sweep began, with its data loading, an overestimate); the next is as long.
                    run_seconds = ends[-1] - ends[max(0, len(ends) - 1 - workers)]
                    clock.estimates[f"sweep:{name}"] = clock.estimates["sweep run"] = 1.05 * run_seconds
                results.add_run({"stage": stage, "sweep": name, **row})
                say(f"  {name}: {len(rows)} runs ended; the last {row.get('outcome')} "
                    f"{row.get('final_val_acc') or row.get('final_test_acc')}")
            # No run starts once the sweep's last ones are in flight (its other workers' runs), and
            # none is left once every run has ended (the sweep is writing its results).
            if rows and size is None:
                size = sweep_size(folder)
            left_to_end = size - len(rows) if size is not None else workers
            at_end = clock.left() <= 0 and left_to_end > 0
            next_too_long = bool(ended) and not clock.fits(f"sweep:{name}") and left_to_end >= workers
            if stopped_at is None and (at_end or next_too_long):
                stopped_at = time.perf_counter()
                say(f"  {name}: stopped (SIGINT) " + ("at the end of the budget" if at_end else
                                                      "as its next run began: it would end after the budget"))
                process.send_signal(signal.SIGINT)
            if stopped_at is not None and time.perf_counter() - stopped_at > 120:
                process.kill()  # a stop that does not come within two minutes
    record = {"stage": stage, "name": name, "exit_code": process.returncode,
              "stopped_by": None if stopped_at is None else "budget",
              "wall_seconds": round(time.perf_counter() - started, 2), "command": shlex.join(command[1:])}
    if is_sweep:
        record["runs_ended"] = len(sweep_rows(folder))
    results.set_timing(f"{stage}:{name}", record)
    results.pack()
    say(f"  {name}: exit code {process.returncode} in {record['wall_seconds']:.0f} s")
    return record


def stage_sweeps(plan: list[tuple[str, list[str]]], extra: list[str], data_dir: Path, results: Results,
                 clock: Clock, earlier: Path | None, workers: str) -> None:
    """Every sweep of ``plan``, in order, as the product's own ``cifar-onecycle sweep`` command with
    ``extra`` flags and ``--workers`` (``auto``: the workers stage's choice on this machine, else 1).
    A later call of this script on the same machine goes on where it stopped; on another machine,
    ``earlier`` (``--sweeps-from``: the ``sweeps`` folder of an unpacked runs.tar.gz) gives the runs
    that ended before, which a sweep does not train again."""
    if workers == "auto":
        choice = results.runs.parent / WORKERS_CHOICE
        n_workers = json.loads(choice.read_text())["workers"] if choice.exists() else 1
        say(f"sweeps: {n_workers} worker(s), " + (f"as {choice} chose" if choice.exists() else
                                                  "the workers stage not having run on this machine"))
    else:
        n_workers = int(workers)
    for name, args in plan:
        if earlier is not None and (earlier / name).is_dir() and not (results.runs / "sweeps" / name).exists():
            shutil.copytree(earlier / name, results.runs / "sweeps" / name)
            say(f"sweeps: {name}: {len(sweep_rows(results.runs / 'sweeps' / name))} runs ended before, from {earlier}")
        if not clock.fits("sweep run"):  # as long as the last sweep's last run
            say(f"sweeps: {name} not started: {clock.left():.0f} s are left in the budget")
            continue
        run_cli("sweeps", name, sweep_args([*args, *extra, "--workers", str(n_workers)], data_dir), results, clock,
                workers=n_workers)


def stage_derived(name: str, source: str, derive: Callable[[Path], list[str]], extra: list[str], data_dir: Path,
                  results: Results, clock: Clock, earlier: Path | None, workers: str) -> None:
    """The sweep ``name`` whose flags ``derive`` gives from the sweep ``source`` on this machine, once
    that has ended (a stage of `best`'s selection, by ``best_selection``'s rules), run as the sweeps
    stage runs its sweeps (a later call goes on with it)."""
    from best_selection import SelectionError

    folder = results.runs / "sweeps" / source
    if not (folder / "sweep.json").is_file():
        say(f"{name}: no sweep {source} here; no {name} yet")
        return
    try:
        args = derive(folder)
    except SelectionError as e:
        say(f"{name}: {e}")
        return
    stage_sweeps([(name, args)], extra, data_dir, results, clock, earlier, workers)


def best_stage2_args(stage1: Path, recipe_file: Path) -> list[str]:
    """Stage 2's flags from stage 1, its recipe written to ``recipe_file`` (the sweep keeps a copy as
    its recipe.toml)."""
    from best_selection import describe, stage2, stage2_args

    recipe, leave_out, chosen, set_aside = stage2(stage1)
    for j in chosen:
        say(f"best2: goes on: {describe(j)}")
    for j, other in set_aside:
        say(f"best2: set aside: {describe(j)}; {other.point.name} changes the same setting by more")
    recipe_file.write_text(recipe.to_toml())
    return stage2_args(recipe_file, leave_out)


def stage_workers(args: list[str], extra: list[str], data_dir: Path, results: Results, clock: Clock) -> None:
    """The same small sweep with one worker (runs in the sweep's process) and with two (two
    ``train`` processes sharing the GPU): does a sweep end sooner with two? The answer is kept on
    the machine (``WORKERS_CHOICE``) for the sweeps stage of this call and of later ones."""
    walls = {}
    for workers in (1, 2):
        record = run_cli("workers", f"workers{workers}",
                         sweep_args([*args, *extra, "--workers", str(workers)], data_dir), results, clock,
                         workers=workers)
        if record["exit_code"] != 0:
            say(f"workers: {workers} worker(s) ended with exit code {record['exit_code']}; no comparison")
            return
        walls[workers] = record["wall_seconds"]
    ratio = walls[2] / walls[1]
    chosen = 2 if ratio <= TWO_WORKERS_AT_MOST else 1
    results.set_timing("workers", {"wall_seconds": walls, "two_over_one": round(ratio, 3), "chosen": chosen})
    (results.runs.parent / WORKERS_CHOICE).write_text(json.dumps({"workers": chosen, "two_over_one": ratio}))
    say(f"workers: 1 worker {walls[1]:.0f} s, 2 workers {walls[2]:.0f} s: the sweeps take {chosen}")


def single_run(stage: str, command: list[str], data_dir: Path, results: Results, clock: Clock) -> None:
    """A stage's one run of the ``seed`` recipe, ``command`` (a ``train`` command, its data and output
    flags left out), into ``STAGE/seed/seed0`` (where device_report.stage_run reads it), measuring only."""
    out = results.runs / stage / "seed" / "seed0"
    run_cli(stage, "seed", [*command, "--data-dir", str(data_dir), "--no-download", "--quiet", "--no-report",
                            "--no-checkpoint", "--overwrite", "--out", str(out)], results, clock)


def stage_torchrun(extra: list[str], data_dir: Path, results: Results, clock: Clock) -> None:
    """A short run under ``torchrun --nproc-per-node 1`` (NCCL on a GPU: the process group and the
    rank-0 writer; DDP and SyncBatchNorm need two GPUs, NCCL refusing two ranks on one), with a holdout."""
    import torch

    single_run("torchrun", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                            "-m", "cifar_onecycle", "train", "--recipe", "seed", "--epochs", "2", "--peak-epoch", "1",
                            "--holdout", "5000", *(["--sync-bn"] if torch.cuda.is_available() else []), *extra],
               data_dir, results, clock)


def stage_fp16(extra: list[str], data_dir: Path, results: Results, clock: Clock) -> None:
    """The ``seed`` recipe in fp16 with loss scaling, seed 0, ``--holdout 5000``: the path ``--precision
    auto`` takes on GPUs without bf16 (a T4, Colab's), never run on a GPU before; its bf16 twin is the
    ``lr`` sweep's ``lr_max=0.2`` seed 0. On a CPU, which refuses fp16, the same run in fp32 checks
    the stage alone."""
    import torch

    precision = "fp16" if torch.cuda.is_available() else "fp32"
    single_run("fp16", ["train", "--recipe", "seed", "--precision", precision, "--holdout", "5000", *extra],
               data_dir, results, clock)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the folder that comes back ($OUT)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "device_run",
                    help="run folders and the built data set (never --out)")
    ap.add_argument("--budget-s", type=float, default=520, help="stop starting work that would end after this")
    ap.add_argument("--reserve-s", type=float, default=150,
                    help="seconds the accuracy stage leaves for the compiled and profile stages")
    ap.add_argument("--commit", help="the commit this tree is (the copy may not be a git checkout)")
    ap.add_argument("--data-dir", type=Path, help="a folder holding cifar-10-batches-py/ (else built from --proxy-tar)")
    ap.add_argument("--proxy-tar", type=Path, default=Path(".gpu/cifar10-proxy.tar.gz"))
    ap.add_argument("--proxy-tool", type=Path, default=Path(".gpu/cifar10_proxy.py"))
    ap.add_argument("--wheels", type=Path, help="a folder of wheels to install for missing packages")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--stages", default="smoke,accuracy,compiled,profile,lr_points",
                    help="in order; also 'speed' (the speed levers, one by one), 'sweeps', 'best2', 'final', "
                         "'workers', 'torchrun', 'fp16'")
    ap.add_argument("--results-name", help="the top folder in runs.tar.gz (default: gpu-<card>)")
    ap.add_argument("--lr-point-seeds", type=int, default=1, help="seeds of the LRMAX points (from 0)")
    ap.add_argument("--lr-points", default="0.05,0.1,0.4,0.8", help="LRMAX values of the seed recipe, seed 0")
    ap.add_argument("--bare-steps", type=int, default=50, help="steps in each timed block of the bare step")
    ap.add_argument("--bare-variants", default=",".join(map(str, range(len(BARE_VARIANTS)))),
                    help="the speed stage's bare-step variants, as indices into BARE_VARIANTS (default: all)")
    ap.add_argument("--sweeps", type=Path, default=Path(__file__).parent / "sweeps" / "lr.txt",
                    help="the sweeps stage's plan: a sweep a line, its name then its 'cifar-onecycle sweep' flags")
    ap.add_argument("--sweeps-from", type=Path,
                    help="a folder of sweeps brought back before (runs.tar.gz's gpu-<card>/sweeps): go on with them")
    ap.add_argument("--workers-sweep", default="--recipe seed --holdout 5000 --vary lr_max=0.2 --seeds 4 --epochs 8",
                    help="the workers stage's sweep, run with 1 worker and with 2")
    ap.add_argument("--sweep-workers", default="auto",
                    help="the sweeps stage's --workers (auto: the workers stage's choice on this machine, else 1)")
    ap.add_argument("--sweep-extra", default="",
                    help="dry runs: flags added to every sweep of the sweeps stage (e.g. --seeds 1)")
    ap.add_argument("--test-subset", type=int, default=0,
                    help="dry runs: the runs made in this process (smoke, accuracy, ...) evaluate on N "
                         "evenly spaced test images; the sweeps read the whole data folder")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="dry runs: change a setting in every recipe (e.g. epochs=1)")
    return ap.parse_args()


def load_data(args: argparse.Namespace) -> tuple[Any, Path]:
    """The data set (built from the carried proxy tar unless --data-dir has it) and its folder; with
    --test-subset, evenly spaced test images (the proxy's are sorted by class)."""
    from cifar_onecycle import Cifar10, load_cifar10

    data_dir = args.data_dir
    if data_dir is None:
        data_dir = args.work / "data"
        if not (data_dir / "cifar-10-batches-py").is_dir():
            subprocess.run([sys.executable, str(args.proxy_tool), str(data_dir), "--tar", str(args.proxy_tar)],
                           check=True)
    data = load_cifar10(data_dir, download=False)
    if args.test_subset:
        keep = [i * len(data.test_images) // args.test_subset for i in range(args.test_subset)]
        data = Cifar10(data.train_images, data.train_labels, data.test_images[keep], data.test_labels[keep])
    say(f"data: {len(data.train_images)} training and {len(data.test_images)} test images from {data_dir}")
    return data, data_dir


def main() -> None:
    args = parse_args()
    clock = Clock(args.budget_s)
    stages = args.stages.split(",")

    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "log.txt", "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (open while the process lives)
    sys.stdout = Tee(sys.__stdout__, log)
    sys.stderr = Tee(sys.__stderr__, log)
    say(ensure_packages(args.wheels))
    if args.commit:  # summary.json's git_commit on a copy that is not a checkout
        os.environ["CIFAR_ONECYCLE_COMMIT"] = args.commit
    from best_selection import final_args
    from cifar_onecycle import load_recipe
    from recipes import setting

    env = environment(args.commit, args)
    card = card_slug(env.get("card"))
    (args.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    say(f"{env.get('card', 'no GPU')}, torch {env['torch']}, CUDA {env['cuda']}, bf16 {env.get('bf16')}; "
        f"budget {args.budget_s:.0f} s")

    data, data_dir = load_data(args)
    changes = dict(setting(text) for text in args.set)
    # the run folders of an earlier call of this command on the same machine would be packed too
    # (but a sweep's: a second call on a warm machine goes on with it)
    for earlier in (args.work / "runs").glob("*"):
        if earlier.name != "sweeps":
            shutil.rmtree(earlier, ignore_errors=True)
    results = Results(args.out, args.work / "runs", args.results_name or f"gpu-{card}")

    def recipe_for(name: str) -> Any:
        return load_recipe(name).replace(**changes)

    found_lrs: dict[str, Any] = {}
    extra = set_flags(args.set)  # --set as flags, for the commands the sweeps, workers and torchrun stages start
    sweep_extra = extra + shlex.split(args.sweep_extra)
    stage_runs: dict[str, Callable[[], None]] = {
        "lr_find": lambda: stage_lr_find(recipe_for, data, results, found_lrs),
        "lr_auto": lambda: stage_lr_auto(recipe_for, data, data_dir, results, clock, found_lrs),
        "smoke": lambda: stage_smoke(recipe_for, data, data_dir, results, clock, recipe_for("seed").epochs),
        "accuracy": lambda: stage_accuracy(recipe_for, args.seeds, data, data_dir, results, clock,
                                           args.reserve_s if {"compiled", "profile"} & set(stages) else 0.0),
        "compiled": lambda: stage_compiled(recipe_for, data, data_dir, results, clock, args.bare_steps,
                                           15.0 if "profile" in stages else 0.0),
        "profile": lambda: stage_profile(recipe_for, results),
        "lr_points": lambda: stage_lr_points(extra, data_dir, results, clock, args.lr_points, args.lr_point_seeds),
        "sweeps": lambda: stage_sweeps(read_sweep_plan(args.sweeps), sweep_extra, data_dir, results, clock,
                                       args.sweeps_from, args.sweep_workers),
        "best2": lambda: stage_derived("stage2", "stage1", lambda s1: best_stage2_args(s1, args.work / "stage2.toml"),
                                       sweep_extra, data_dir, results, clock, args.sweeps_from, args.sweep_workers),
        "final": lambda: stage_derived("final", "stage2", final_args, sweep_extra, data_dir, results, clock,
                                       args.sweeps_from, args.sweep_workers),
        "workers": lambda: stage_workers(shlex.split(args.workers_sweep), extra, data_dir, results, clock),
        "torchrun": lambda: stage_torchrun(extra, data_dir, results, clock),
        "fp16": lambda: stage_fp16(extra, data_dir, results, clock),
        "speed": lambda: stage_speed(recipe_for, data, data_dir, results, clock, args.bare_steps,
                                     15.0 if "profile" in stages else 0.0,
                                     [int(i) for i in args.bare_variants.split(",")]),
    }
    for stage in stages:
        if clock.left() <= 0:
            say(f"{stage}: skipped, the budget is spent")
            continue
        started = time.perf_counter()
        try:
            stage_runs[stage]()
        except SystemExit:
            raise
        except Exception:  # a broken stage must not cost the others their minutes
            say(f"{stage}: FAILED\n{traceback.format_exc()}")
        results.set_timing(f"stage_{stage}_seconds", round(time.perf_counter() - started, 2))
    results.pack()
    say(f"done in {time.perf_counter() - clock.start:.0f} s")


if __name__ == "__main__":
    main()
