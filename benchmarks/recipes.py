"""The shipped recipes over several seeds, side by side, against the accuracy targets.

    python benchmarks/recipes.py --data-dir DIR --out OUT [--seeds 5] [--recipes seed,dawnbench,best]
                                 [--set key=value ...] [--table-only]

Trains each recipe with ``train_seeds`` into OUT/<recipe>/ (one sub-folder a seed). A folder that
already holds a recipe's runs is resumed: finished seeds are read back, so the work can be spread
over several calls. Then prints a markdown table of the last epoch's test accuracy over seeds,
without and with flip TTA, and the differences the proxy targets are stated in: ``best`` minus
``dawnbench`` (at least +0.5 point) and ``seed`` minus ``dawnbench`` (at least -2 points).
``--set`` changes a setting in every recipe (a shorter run, for example: ``--set epochs=12 --set
peak_epoch=2.5 --set train_subset=5000``); the table says so. ``--table-only`` trains nothing.
The table also goes to OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cifar_onecycle import load_recipe, train_seeds
from cifar_onecycle.recipe import tomllib
from cifar_onecycle.run_folder import SEEDS

TARGETS = {"best": 0.5, "seed": -2.0}  # points against dawnbench's mean, on the proxy (issue #5)


def setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value  # a bare word: a string setting such as device=cuda


def pct(s: dict[str, Any] | None, extremes: bool = True) -> str:
    """A spread over seeds (``results.spread``) in percent: mean ± std (std None: one seed), and (with
    ``extremes``) min to max."""
    if s is None:
        return "n/a"
    shown = f"{100 * s['mean']:.2f}" + ("" if s["std"] is None else f" ± {100 * s['std']:.2f}")
    return shown + (f" ({100 * s['min']:.2f} to {100 * s['max']:.2f})" if extremes else "")


def table(out: Path, names: list[str], changes: dict[str, Any]) -> str:
    summaries = {n: json.loads((out / n / "summary.json").read_text()) for n in names
                 if (out / n / "summary.json").is_file()}
    lines = ["| recipe | seeds | test acc % (mean ± std, min to max) | with flip TTA % | best - dawnbench or "
             "seed - dawnbench, points (target) |", "| --- | --- | --- | --- | --- |"]
    base = summaries.get("dawnbench")
    for name, s in summaries.items():
        diff = ""
        if base and name in TARGETS:
            d = 100 * (s["final_test_acc"]["mean"] - base["final_test_acc"]["mean"])
            diff = f"{d:+.2f} (>= {TARGETS[name]:+.1f}: {'met' if d >= TARGETS[name] else 'not met'})"
        lines.append(f"| {name} | {s['runs']} | {pct(s['final_test_acc'])} | {pct(s['final_test_acc_tta'])} | {diff} |")
    first: dict[str, Any] = next(iter(summaries.values()), {})
    lines += ["", f"{first.get('epochs')} epochs, {first.get('train_images')} training and {first.get('test_images')} "
              f"test images, {first.get('device')}, {first.get('precision')}; settings changed in every recipe: "
              f"{changes or 'none'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--recipes", default="seed,dawnbench,best")
    p.add_argument("--set", action="append", default=[], type=setting, metavar="KEY=VALUE")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    names, changes = args.recipes.split(","), dict(args.set)
    for name in names if not args.table_only else ():
        folder = args.out / name
        if (folder / SEEDS).is_file():
            train_seeds(resume=folder, data_dir=args.data_dir, report=False)
        else:
            recipe = load_recipe(name).replace(**changes)
            train_seeds(recipe, args.seeds, out=folder, data_dir=args.data_dir, download=False, report=False)
    text = table(args.out, names, changes)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
