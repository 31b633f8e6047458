"""README.md of a GPU results folder, generated from the files ``device_run.py`` brought back.

    python benchmarks/device_report.py benchmarks/results/gpu-h200 [--command "..."]

Reads the run folders (``<stage>/<recipe>/seed<k>/summary.json``), ``timing.json``, ``env.json``,
``profile.json`` and ``progress.jsonl`` there and writes ``README.md`` beside them: the recipes'
last-epoch test accuracy over seeds against the proxy targets, the compiled timing, the bare step,
the top kernels, the LRMAX points, each sweep's table (from its sweep.json and sweep.csv) and
picture, the workers' timing, the torchrun run and the fp16 run. Nothing is typed in by hand:
rerun it after adding runs (a second call's files unpacked into the same folder).
It reads the files of the current ``device_run.py``; the READMEs of older folders (gpu-h200,
gpu-h200-levers, gpu-h100) are kept as their own code generated them, not regenerated.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path
from typing import Any

from cifar_onecycle.report import markdown_table
from cifar_onecycle.results import SPLIT_NAMES, split_of, spread
from cifar_onecycle.sweep import CURVES, PICTURE
from cifar_onecycle.sweep_report import seeds_in_words, sweep_table_rows
from device_run import RECIPES
from recipes import TARGETS, pct  # TARGETS: points against dawnbench's mean on the proxy data


def runs(folder: Path, stage: str) -> dict[str, list[dict[str, Any]]]:
    """Each recipe's finished runs of ``stage`` (their summary.json and per-epoch seconds), by seed."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((folder / stage).glob("*/seed*/summary.json"), key=lambda p: (p.parent.parent.name,
                                                                                     int(p.parent.name[4:]))):
        summary = json.loads(path.read_text())
        with open(path.parent / "metrics.csv", newline="") as f:
            summary["train_seconds"] = sum(float(row["train_seconds"]) for row in csv.DictReader(f))
        summary["seed"] = int(path.parent.name[4:])
        found.setdefault(path.parent.parent.name, []).append(summary)
    return found


def accuracy_section(folder: Path) -> list[str]:
    found = runs(folder, "accuracy")
    if not found:
        return []
    stats = {name: {key: spread([r[key] for r in found[name]]) for key in ("final_test_acc", "final_test_acc_tta")}
             for name in RECIPES if name in found}
    base = stats.get("dawnbench")
    table = [["recipe", "seeds", "test accuracy % (mean ± std)", "min to max", "with flip TTA % (mean ± std)",
              "minus dawnbench, points", "proxy target", "training s (mean)", "wall s (mean)"]]
    for name, s in stats.items():
        acc = s["final_test_acc"]
        diff, target = "", ""
        if base and name != "dawnbench":
            d = 100 * (acc["mean"] - base["final_test_acc"]["mean"])
            diff = f"{d:+.2f}"
            if name in TARGETS:
                target = f">= {TARGETS[name]:+.1f}: {'met' if d >= TARGETS[name] else 'NOT met'}"
        seeds = ", ".join(str(r["seed"]) for r in found[name])
        table.append([f"`{name}`", seeds, pct(acc, extremes=False), f"{100 * acc['min']:.2f} to {100 * acc['max']:.2f}",
                      pct(s["final_test_acc_tta"], extremes=False), diff, target,
                      f"{statistics.fmean(r['train_seconds'] for r in found[name]):.1f}",
                      f"{statistics.fmean(r['total_seconds'] for r in found[name]):.1f}"])
    every = [["recipe", "seed", "test %", "flip TTA %", "without average %", "training s", "wall s"]]
    for name in stats:
        for r in found[name]:
            alone = r.get("final_test_acc_without_ema")
            every.append([f"`{name}`", str(r["seed"]), f"{100 * r['final_test_acc']:.2f}",
                          f"{100 * r['final_test_acc_tta']:.2f}", "" if alone is None else f"{100 * alone:.2f}",
                          f"{r['train_seconds']:.1f}", f"{r['total_seconds']:.1f}"])
    return [*markdown_table(table), "", "Every run (last epoch; `without average` is `best`'s trained weights alone, "
            "without the weight average):", "", *markdown_table(every)]


def timing_section(folder: Path) -> list[str]:
    path = folder / "timing.json"
    if not path.is_file() or "compiled_seed" not in json.loads(path.read_text()):
        return []
    t = json.loads(path.read_text())["compiled_seed"]
    eager = runs(folder, "accuracy").get("seed", [])
    table = [["what", "seconds"],
             ["training time, sum of the 24 epochs' `train_seconds`", f"{t['train_seconds_total']:.2f}"],
             ["of which compilation and warm-up (first epoch minus the median epoch)",
              f"{t['compile_and_warmup_seconds']:.2f}"],
             ["training time without compilation (first epoch counted at the median)",
              f"{t['train_seconds_without_compile']:.2f}"],
             ["median epoch", f"{t['median_epoch_seconds']:.3f}"],
             ["wall clock of the run, evaluation after every epoch included", f"{t['wall_seconds']:.2f}"]]
    if eager:
        table.append([f"the same recipe eager (mean of {len(eager)} seeds, accuracy stage)",
                      f"{statistics.fmean(r['train_seconds'] for r in eager):.2f}"])
    lines = [*markdown_table(table), "", f"Test accuracy of the compiled run: {100 * t['final_test_acc']:.2f}%."]
    if "bare_compiled_images_per_second" in t:
        bare = {k: statistics.median(t[f"bare_{k}_images_per_second"]) for k in ("eager", "compiled")}
        lines += ["", *markdown_table([["step", "images/s (median of 3 blocks)"],
                                       ["whole loop, compiled (median epoch)",
                                        f"{t['whole_loop_images_per_second_median']:.0f}"],
                                       ["bare step, compiled", f"{bare['compiled']:.0f}"],
                                       ["bare step, eager", f"{bare['eager']:.0f}"]]), "",
                  f"Whole loop / bare compiled step: **{t['ratio_whole_over_bare_compiled']:.3f}** "
                  f"(blocks: {', '.join(f'{v:.0f}' for v in t['bare_compiled_images_per_second'])} img/s)."]
    return lines


def profile_section(folder: Path) -> list[str]:
    path = folder / "profile.json"
    if not path.is_file():
        return []
    reports = json.loads(path.read_text())
    if "top" in reports:  # the first call's file profiled the eager step alone
        reports = {"eager": reports}
    lines = []
    for label, p in reports.items():
        kernels = (f"{p['kernel_seconds'] * 1e3 / p['steps']:.2f} ms of kernels a step, "
                   f"**{p['achieved_tflops_kernels']:.0f} TFLOP/s** over the kernels' time "
                   if p["kernel_seconds"] else "no GPU kernels, ")
        lines += [f"**{label}**: {p['steps']} bare steps of batch {p['batch_size']}, {p['precision']}, under "
                  f"torch.profiler: {p['training_gflop_per_image']:.2f} GFLOP an image (convolutions and the linear "
                  f"layer, x3 for training); {kernels}"
                  f"({p['achieved_tflops_wall']:.1f} over the wall clock with the profiler on).", "",
                  *markdown_table([["share of kernel time", "calls", "kernel"],
                                   *([f"{100 * row['share']:.1f}%", str(row["calls"]), f"`{row['name'][:90]}`"]
                                     for row in p["top"][:12])]), ""]
    return lines


IMAGES_PER_RUN = 24 * 97 * 512  # 24 epochs of 97 full batches of 512


def speed_section(folder: Path) -> list[str]:
    path = folder / "timing.json"
    speed = json.loads(path.read_text()).get("speed") if path.is_file() else None
    if not speed:
        return []
    bare = {b["variant"]: b for b in speed["bare"]}
    lines = ["The bare step (forward, backward, SGD on one fixed batch of 512), one lever at a time (the "
             "variants the call chose from `BARE_VARIANTS`). Median of 5 timed blocks after 3 warm-up steps:", "",
             *markdown_table([["variant", "images/s (median)", "blocks, images/s", "24 epochs at this speed, s"],
                              *([b["variant"], f"{b['median']:.0f}",
                                 ", ".join(f"{r:.0f}" for r in b["images_per_second"]),
                                 f"{IMAGES_PER_RUN / b['median']:.2f}"] for b in speed["bare"])])]
    if "augmentation_epoch_seconds_one_batch_at_a_time" in speed:
        lines += ["", "The augmentation alone (shuffle, draws, gather, crop, flip, normalise, CutOut of one epoch's "
                  "batches), s an epoch: one batch at a time "
                  f"{', '.join(f'{t:.4f}' for t in speed['augmentation_epoch_seconds_one_batch_at_a_time'])}; "
                  "as the library does it on a GPU (`GPU_AUGMENT_IMAGES` at once) "
                  f"{', '.join(f'{t:.4f}' for t in speed['augmentation_epoch_seconds'])}."]
    elif "augmentation_epoch_seconds" in speed:
        lines += ["", "The augmentation alone (shuffle, gather, crop, flip, normalise, CutOut of one epoch's "
                  f"batches): {', '.join(f'{t:.3f}' for t in speed['augmentation_epoch_seconds'])} s an epoch."]
    lines += ["", "The whole loop, `seed` recipe, 24 epochs, seed 0, with the library's CUDA defaults of the time "
              "(fused SGD, one host synchronisation an epoch; cuDNN as in the matching bare variant); "
              "compilation time shows only where the bare variants had not compiled the same graphs first:", ""]
    loops = [["loop", "training s", "of which compilation and warm-up", "training s without it", "median epoch s",
              "wall s", "test %", "whole loop / bare step"]]
    for loop in speed["loops"]:
        match = bare.get(loop["bare_variant"])
        ratio = f"{loop['whole_loop_images_per_second_median'] / match['median']:.3f}" if match else ""
        loops.append([loop["variant"], f"{loop['train_seconds_total']:.2f}",
                      f"{loop['compile_and_warmup_seconds']:.2f}", f"{loop['train_seconds_without_compile']:.2f}",
                      f"{loop['median_epoch_seconds']:.3f}",
                      f"{loop['wall_seconds']:.2f}", f"{100 * loop['final_test_acc']:.2f}", ratio])
    lines += markdown_table(loops)
    again = [r for name, rs in runs(folder, "speed").items() for r in rs if r["seed"] != 0]
    for r in again:
        lines += ["", f"The fastest compiled loop again with seed {r['seed']}: {100 * r['final_test_acc']:.2f}% "
                  f"({r['train_seconds']:.2f} s of training, compilation included)."]
    return lines


def cold_run_section(folder: Path) -> list[str]:
    """A run of the command line in a fresh process with an empty compilation cache (``cold-cli-run/``)."""
    path = folder / "cold-cli-run" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        epochs = [float(row["train_seconds"]) for row in csv.DictReader(f)]
    summary = json.loads((folder / "cold-cli-run" / "summary.json").read_text())
    steady = statistics.median(epochs[1:])
    return [f"`cifar-onecycle train --recipe seed --compile --compile-mode reduce-overhead`, {len(epochs)} epochs, in "
            "a fresh process with an empty TorchInductor cache (`TORCHINDUCTOR_CACHE_DIR` on a new folder), as a "
            f"user's first run meets it: training {sum(epochs):.2f} s (the epochs' `train_seconds`), of which the "
            f"first epoch {epochs[0]:.2f} s against a median epoch of {steady:.3f} s: compilation, CUDA-graph "
            f"recording and warm-up {epochs[0] - steady:.2f} s, training without it {steady * len(epochs):.2f} s. "
            f"The run's own clock (data loading, compilation, every evaluation): {summary['total_seconds']:.1f} s. "
            f"Test accuracy {100 * summary['final_test_acc']:.2f}% "
            f"(flip TTA {100 * summary['final_test_acc_tta']:.2f}%)."]


def lr_find_section(folder: Path) -> list[str]:
    files = sorted((folder / "lr_find").glob("*/seed0/lr_find.json"))
    if not files:
        return []
    seconds = {}
    if (folder / "progress.jsonl").is_file():
        for line in (folder / "progress.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("stage") == "lr_find":
                seconds[record["recipe"]] = record["seconds"]
    lines = ["`cifar-onecycle lr-find --recipe NAME --mode both` as the code of this call ran it (exponential "
             "sweep from 1e-5 to 10, linear sweep from 1e-4 to 1; the length is the iterations column, 97 to an "
             "epoch), graphs in `lr_find/<recipe>/seed0/`:",
             "", "| recipe | sweep | iterations | LRMAX (rule) | LRMIN (rule) | stopped early | note | seconds, both "
             "sweeps |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in files:
        recipe = path.parent.parent.name
        for mode, r in json.loads(path.read_text()).items():
            def shown(lr: float | None) -> str:
                return "none" if lr is None else f"{lr:.4g}"
            lines.append(f"| `{recipe}` | {mode} | {len(r['lrs'])} | "
                         f"{shown(r['suggested_lr_max'])} ({r['lr_max_rule']}) "
                         f"| {shown(r['suggested_lr_min'])} ({r['lr_min_rule']}) | {r['stopped'] or ''} | "
                         f"{r['note'] or ''} | {seconds.get(recipe, '')} |")
    return lines


def lr_section(folder: Path) -> list[str]:
    found = runs(folder, "lr_points")
    seed_runs = runs(folder, "accuracy").get("seed", [])
    auto = runs(folder, "lr_auto")
    if not found and not seed_runs and not auto:
        return []
    points: dict[float, list[dict[str, Any]]] = {}
    found_lr = {r["lr_max"] for r in auto.get("seed-lrmax-found", [])}
    for runs_of in found.values():
        for r in runs_of:
            if r["lr_max"] in found_lr:  # more seeds at the range test's LRMAX: they join its row
                auto["seed-lrmax-found"].append(r)
            else:
                points.setdefault(r["lr_max"], []).append(r)
    for r in seed_runs:
        points.setdefault(r["lr_max"], []).append(r)
    diverged = [{"lr_max": float(p.parent.parent.name.partition("=")[2]), "seed": int(p.parent.name[4:]),
                 **json.loads(p.read_text())} for p in (folder / "lr_points").glob("lr_max=*/seed*/failed.json")]
    lines = ["| LRMAX | seeds | test accuracy % (each seed) | mean % |", "| --- | --- | --- | --- |"]
    for lr in sorted(points):
        rs = sorted(points[lr], key=lambda r: r["seed"])
        each = ", ".join(f"{100 * r['final_test_acc']:.2f}" for r in rs)
        lines.append(f"| {lr:g} | {', '.join(str(r['seed']) for r in rs)} | {each} | "
                     f"{100 * statistics.fmean(r['final_test_acc'] for r in rs):.2f} |")
    for d in diverged:
        lines.append(f"| {d['lr_max']:g} | {d['seed']} | {d['reason']}: {d['message']} | |")
    for name, rs in auto.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        what = "found LRMAX" + (f" and LRMIN {rs[0]['lr_min']:.3g}" if "lrmin" in name else "")
        each = ", ".join(f"{100 * r['final_test_acc']:.2f}" for r in rs)
        lines.append(f"| {rs[0]['lr_max']:.4g} ({what}) | {', '.join(str(r['seed']) for r in rs)} | {each} | "
                     f"{100 * statistics.fmean(r['final_test_acc'] for r in rs):.2f} |")
    return lines


def sweeps_section(folder: Path) -> list[str]:
    """Each sweep of the sweeps stage: its table from sweep.json (the product's, as sweep.md has it)
    and its pictures."""
    lines: list[str] = []
    for path in sorted((folder / "sweeps").glob("*/sweep.json")):
        stats, name = json.loads(path.read_text()), path.parent.name
        settings, words = ", ".join(stats.get("settings", stats["vary"])), SPLIT_NAMES[split_of(stats["selection"])]
        lines += [f"### `{name}`: {settings}, {seeds_in_words(stats['seeds'])}, baseline {stats['baseline'] or 'none'}",
                  "", f"Choose on the {words} accuracy; mean % over the runs that finished (standard error); the "
                  "paired difference is by seed, in points.", "", *markdown_table(sweep_table_rows(stats))]
        if stats["remaining_runs"]:
            lines.append(f"\n{stats['remaining_runs']} runs of this sweep were not trained (the budget).")
        lines += ["", f"![{name}](sweeps/{name}/{PICTURE})", "", f"![{name}, curves](sweeps/{name}/{CURVES})", ""]
    return lines


def workers_section(folder: Path) -> list[str]:
    timing_path = folder / "timing.json"
    timing = json.loads(timing_path.read_text()).get("workers") if timing_path.is_file() else None
    if not timing:
        return []
    walls = timing["wall_seconds"]
    return [f"The same sweep (`--workers-sweep`, in `workers/`) with 1 worker (in the sweep's process): "
            f"{walls['1']:.1f} s; with 2 `train` processes sharing the GPU: {walls['2']:.1f} s "
            f"(ratio {timing['two_over_one']:.3f})."]


def stage_run(folder: Path, stage: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The summary.json of a stage's one run (``STAGE/seed/seed0``), else what its section says
    instead: nothing when the stage did not run, where its output is when the run did not finish."""
    summary_path = folder / stage / "seed" / "seed0" / "summary.json"
    if not (folder / stage).is_dir():
        return None, []
    if not summary_path.is_file():
        return None, [f"The run did not finish; its output is `{stage}/seed.log`."]
    return json.loads(summary_path.read_text()), []


def torchrun_section(folder: Path) -> list[str]:
    summary, instead = stage_run(folder, "torchrun")
    if summary is None:
        return instead
    sync_bn = " --sync-bn" if str(summary.get("device")).startswith("cuda") else ""  # refused on a CPU
    return [f"`torchrun --standalone --nproc-per-node 1 -m cifar_onecycle train{sync_bn} --holdout 5000`, "
            f"epochs: {summary['epochs']}; finished on {summary.get('device')}, validation accuracy "
            f"{100 * summary['final_val_acc']:.2f}%, test {100 * summary['final_test_acc']:.2f}%. Its output: "
            "`torchrun/seed.log`."]


def fp16_section(folder: Path) -> list[str]:
    """The fp16 run beside its bf16 twin: the ``lr`` sweep's run at the seed's LRMAX, seed 0."""
    summary, instead = stage_run(folder, "fp16")
    if summary is None:
        return instead

    def scores(summary: dict[str, Any]) -> str:
        return (f"validation accuracy {100 * summary['final_val_acc']:.2f}%, "
                f"test {100 * summary['final_test_acc']:.2f}%, {summary['total_seconds']:.1f} s in all")

    lines = [f"`cifar-onecycle train --recipe seed --precision {summary['precision']} --holdout 5000`, seed 0, "
             f"epochs: {summary['epochs']}; on {summary.get('device')}: {scores(summary)}. "
             "Its output: `fp16/seed.log`."]
    twin = folder / "sweeps" / "lr" / "lr_max=0.2" / "seed0" / "summary.json"
    if twin.is_file():
        bf16 = json.loads(twin.read_text())
        lines.append(f"The same run in {bf16['precision']} (the `lr` sweep's lr_max=0.2, seed 0): {scores(bf16)}.")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--command", help="the command that made the files, for the page (default: the one env.json "
                                      "records; a folder from before it did: the first GPU session's)")
    args = ap.parse_args()
    folder = args.folder
    env = json.loads((folder / "env.json").read_text())
    command = args.command or env.get("command") or ("PYTHONPATH=src python3 benchmarks/device_run.py --out $OUT "
                                                     "--budget-s 530 --reserve-s 110 --commit SHA --wheels .gpu")
    text = [f"# {env.get('card', 'CPU')}: benchmarks/device_run.py on the GPU machine",
            "",
            f"Generated by `python benchmarks/device_report.py {folder}` from the files in this folder. "
            f"Card: {env.get('card')} ({env.get('nvidia_smi')}); torch {env['torch']}, CUDA {env['cuda']}, "
            f"cuDNN {env['cudnn']}; code at commit {env['commit']}; started {env['started_utc']}. "
            "Data: the CIFAR-10 proxy (real CIFAR-10 photos stored as JPEG quality 75; 50,000 training and "
            "5,000 test images), built on the machine by `../shared/tools/cifar10_proxy.py`. All runs eager "
            "bf16 autocast, channels_last, 24 epochs of 97 steps at batch 512, unless the section says "
            "otherwise. The reported accuracy is always the last epoch's, on the 5,000 test images.",
            *([f"Every run's settings changed by `--set`: {', '.join(changed)}."]
              if (changed := env.get("args", {}).get("set")) else []),
            "", "Command, on the GPU machine from the repository root (its log is `log.txt`):", "",
            f"```bash\n{command}\n```", ""]
    sections = (("Accuracy over seeds", accuracy_section),
                ("Compiled timing (`seed` recipe, `torch.compile` default mode, seed 0)", timing_section),
                ("Speed levers", speed_section),
                ("A first run from the command line, compilation included", cold_run_section),
                ("Where the time goes", profile_section),
                ("LR range test", lr_find_section),
                ("LRMAX points (`seed` recipe; an accuracy stage's runs count at their LRMAX, 0.2)", lr_section),
                ("Sweeps (`cifar-onecycle sweep`, on the validation split)", sweeps_section),
                ("Two workers on one GPU", workers_section),
                ("torchrun (NCCL)", torchrun_section),
                ("fp16 with loss scaling (the path of GPUs without bf16)", fp16_section))
    for title, section in sections:
        lines = section(folder)
        if lines:  # a call that did not run the stage has no section
            text += [f"## {title}", "", *lines, ""]
    (folder / "README.md").write_text("\n".join(text) + "\n")
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main()
