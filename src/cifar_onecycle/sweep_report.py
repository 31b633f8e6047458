"""What a sweep leaves behind to look at, and a set of seeds (one recipe over seeds, a sweep of
one point): sweep.png (the selection accuracy against the setting varied, or a line a point of a
list), sweep_curves.png, the sweep's table and sweep.md; a set of seeds' curves.png and seeds.md.
``sweep.SweepFolder.write_results`` and ``seeds.write_seeds_results`` write them. The figures are
``report.py``'s kind: matplotlib Figures on the Agg canvas, nothing shown.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .report import markdown_table, new_figure, whole_epochs
from .results import SPLIT_NAMES, mean_curve, split_of
from .run_folder import CURVES_PNG
from .sweep_plan import AUTO, LOG_SETTINGS, Plan, Point, format_point, format_value

# A sweep's curves picture draws its first points only: past a couple of dozen lines no colour
# tells them apart (and a plan from someone else's folder must not decide how many metrics files
# are read).
MAX_CURVES = 20
# A grid's picture names each value swept up to this many; beyond, its axis has matplotlib's own
# ticks (3,000 named ticks took 11 s to draw).
MAX_TICKS = 30
# A list's picture draws its first points only: a plan (someone else's file, say) of thousands
# would make a figure hundreds of inches tall (3,000 points took 720 MB and 19 s).
MAX_LIST_POINTS_DRAWN = 100


def plot_sweep(plan: Plan, rows: list[dict[str, Any]], stats: dict[str, Any]) -> Any:
    """The selection accuracy against the first varied setting: a dot per seed, the mean with its
    standard error, a line per value of the other settings; a log axis for LRs and weight decay;
    the baseline's mean a dashed line; ``auto`` points at the LRs the range test found."""
    from matplotlib.ticker import NullFormatter

    selection = stats["selection"]
    rows_of = selection_rows(rows, selection)
    if plan.listed is not None:
        return say_when_empty(plot_point_list(plan, rows_of, stats), not rows_of)
    x_name = next(iter(plan.vary))
    x_values = plan.vary[x_name]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x_values if v != AUTO)
    fig = new_figure((7.5, 4.5))
    ax = fig.subplots()
    by_name = {p["point"]: p for p in stats["points"]}
    others = [k for k in plan.vary if k != x_name]
    groups: dict[tuple, list[Point]] = {}
    for point in plan.points:
        groups.setdefault(tuple((k, v) for k, v in point.values if k != x_name), []).append(point)

    def position(point: Point, found: list[float]) -> float | None:
        """Where a point sits on the x axis; an ``auto`` point at the (geometric mean of the) LRs found."""
        value = dict(point.values)[x_name]
        if not numeric:
            return float(x_values.index(value))
        if value != AUTO:
            return float(value)
        found = [f for f in found if f > 0]
        return math.exp(statistics.fmean(math.log(f) for f in found)) if found else None

    for i, (rest, points) in enumerate(groups.items()):
        color = f"C{i % 10}"
        label = format_point(dict(rest)) if others else None
        xs, means, errors = [], [], []
        for point in points:
            point_rows = rows_of.get(point.name, [])
            auto = x_name in point.found  # its runs trained at the LR the range test found
            used = x_name + "_used"
            for r in point_rows:
                x = position(point, [r[used]] if auto and r.get(used) else [])
                if x is not None:
                    ax.plot(x, 100 * r[selection], "x" if auto else ".", color=color, alpha=0.5)
            entry = by_name.get(point.name, {}).get(selection)
            x = position(point, [r[used] for r in point_rows if auto and r.get(used)])
            if entry and x is not None:
                error = entry["sem"] or 0.0
                ax.errorbar(x, 100 * entry["mean"], yerr=100 * error, fmt="D" if auto else "o", color=color,
                            capsize=3, label=("range test's suggestion (auto)" if auto and i == 0 else None))
                if auto:  # the LR it stands at, which no tick names
                    ax.annotate(f"{x:.3g}", (x, 100 * entry["mean"]), textcoords="offset points", xytext=(6, 4),
                                fontsize="small", color=color)
                if not auto:
                    xs.append(x)
                    means.append(100 * entry["mean"])
                    errors.append(100 * error)
        if xs:
            order = sorted(range(len(xs)), key=xs.__getitem__)
            ax.plot([xs[j] for j in order], [means[j] for j in order], "-", color=color, label=label)
    baseline = stats.get("baseline")
    if baseline and by_name.get(baseline, {}).get(selection):
        ax.axhline(100 * by_name[baseline][selection]["mean"], color="0.4", ls="--", lw=1,
                   label=f"baseline {baseline}")
    if numeric:
        if x_name in LOG_SETTINGS:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # no "3x10^-2" between the values swept
        fixed = sorted({float(v) for v in x_values if v != AUTO})
        if len(fixed) <= MAX_TICKS:  # more: matplotlib's own ticks
            ax.set_xticks(fixed, [format_value(v) for v in fixed])
    elif len(x_values) <= MAX_TICKS:
        ax.set_xticks(range(len(x_values)), [format_value(v) for v in x_values])
    words, title = sweep_words(plan, selection)
    ax.set(xlabel=x_name, ylabel=f"final {words} accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return say_when_empty(fig, not rows_of)


NOTHING_YET = "no run has finished yet"


def say_when_empty(fig: Any, empty: bool) -> Any:
    """``fig`` with ``NOTHING_YET`` across each of its plots when ``empty``: a sweep's pictures
    before any of its runs ended are axes and nothing else, which read as a broken picture."""
    for ax in fig.axes if empty else []:
        ax.text(0.5, 0.5, NOTHING_YET, transform=ax.transAxes, ha="center", va="center", color="0.4")
    return fig


def seeds_in_words(seeds: Sequence[int]) -> str:
    """A range of seeds as pages and lines name it: "seed 3", or "seeds 3 to 7"."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]} to {seeds[-1]}"


def sweep_words(plan: Plan, selection: str) -> tuple[str, str]:
    """The accuracy a sweep's picture shows, in words, and the picture's title."""
    words = SPLIT_NAMES[split_of(selection)]
    seeds = seeds_in_words(plan.seed_range)
    return words, (f"{words} accuracy, {seeds}" if plan.seeds == 1 else
                   f"{words} accuracy over {seeds}\ndots are runs, bars the standard error")


def sweep_table_rows(stats: dict[str, Any], short: bool = False) -> list[list[str]]:
    """sweep.json's points as a table, its header first: each point's runs (those that failed
    counted by outcome), the selection accuracy (the mean in % over the runs that finished, its
    standard error in brackets), the difference from the baseline paired by seed (points), and the
    test accuracy when the selection is the validation split's; unless ``short``, each with flip TTA
    too, and the LRs each seed found where a point has ``auto`` ones. ``cifar-onecycle sweep``
    prints the short table; sweep.md holds the whole one."""
    selection = stats["selection"]
    split = split_of(selection)
    words, on_val = SPLIT_NAMES[split], split == "val"
    found = not short and any(p.get("found") for p in stats["points"])

    def pct(entry: dict[str, Any] | None, sign: str = "") -> str:
        if not entry or entry.get("mean") is None:
            return "-"
        sem = f" ({100 * entry['sem']:.2f})" if entry.get("sem") is not None else ""
        return f"{100 * entry['mean']:{sign}.2f}{sem}"

    def lrs(point: dict[str, Any]) -> str:
        return "; ".join(f"{name} " + ", ".join("-" if lr is None else f"{lr:.3g}" for lr in values)
                         for name, values in (point.get("found") or {}).items()) or "-"

    shown = [selection, *([] if short else [selection + "_tta"])]  # the accuracy columns, the selection's first
    if on_val:
        shown += ["final_test_acc", *([] if short else ["final_test_acc_tta"])]
    names = {selection: f"{words} % (sem)", selection + "_tta": f"{words} with flip TTA % (sem)",
             "final_test_acc": "test % (sem)", "final_test_acc_tta": "test with flip TTA % (sem)"}
    table = [["point", "runs", names[selection], "vs baseline (sem)", *(names[a] for a in shown[1:]),
              *(["LRs found, by seed"] if found else [])]]
    for p in stats["points"]:
        chosen = p.get(selection) or {}
        failed = ", ".join(f"{n} {outcome}" for outcome, n in p["outcomes"].items() if outcome != "finished")
        row = [p["point"], f"{p['runs']}" + (f" ({failed})" if failed else ""), pct(chosen),
               "baseline" if p["point"] == stats["baseline"] else pct(chosen.get("paired_difference"), "+"),
               *(pct(p.get(a)) for a in shown[1:])]
        table.append(row + ([lrs(p)] if found else []))
    return table


def sweep_markdown(stats: dict[str, Any]) -> str:
    """sweep.md: the sweep's whole table (``sweep_table_rows``) and its pictures on one page, ready
    to paste into a README, with what the numbers are and which of them to choose on."""
    split = split_of(stats["selection"])
    words, on_val = SPLIT_NAMES[split], split == "val"
    seeds = stats["seeds"]
    over = seeds_in_words(seeds)
    what = (f"a grid of {', '.join(stats['vary'])}" if stats["vary"] else
            f"a list of changes to the recipe ({', '.join(stats['settings'])})")
    choose = ("Choose on the validation accuracy (training images the recipe holds out, the same for every "
              "point that keeps its holdout), and report the test accuracy of the point chosen." if on_val
              else "These are test accuracies (the recipe holds no images out): choosing a setting on them tunes "
              "it to the test set; `--holdout N` gives a validation split to choose on.")
    baseline = (f"\"vs baseline\" is the difference from `{stats['baseline']}` paired by seed, in points."
                if stats["baseline"] else "There is no baseline point to compare with.")
    lines = [f"# Sweep: {what}, {over}", "",
             "Each point trains `recipe.toml` with its settings changed, a run folder a seed (`POINT/seedK/`); "
             "the means are over the runs that finished, in %, their standard error in brackets. "
             f"{baseline} {choose}", "", *markdown_table(sweep_table_rows(stats)), ""]
    for p in stats["points"]:
        if p.get("weights_from"):
            lines += [f"`{p['point']}` changes only the evaluation: its runs are the weights of "
                      f"{' and '.join(f'`{twin}`' for twin in p['weights_from'])} (the same seed) evaluated again, "
                      "so its difference from them is the evaluation's alone.", ""]
    left = stats["remaining_runs"]
    if left:
        lines += [f"{left} run{' has' if left == 1 else 's have'} not ended: the same `cifar-onecycle sweep` "
                  "command goes on with them.", ""]
    from .sweep import CURVES, PICTURE  # sweep.py draws with this module: imported here, not at its top

    lines += [f"![final {words} accuracy against the setting]({PICTURE})", "",
              f"![training loss and {words} accuracy per epoch]({CURVES})", ""]
    return "\n".join(lines)


# A set of seeds' accuracies, in the order seeds.md shows them: what settings are chosen on first.
SEED_COLUMNS = {"final_val_acc": "validation %", "final_val_acc_tta": "validation with flip TTA %",
                "final_test_acc": "test %", "final_test_acc_tta": "test with flip TTA %",
                "final_test_acc_without_ema": "test without the weight average %"}


def seeds_markdown(summary: dict[str, Any], curves: bool = True) -> str:
    """seeds.md: a set of seeds' final accuracies (``seeds.seeds_summary``), a row a seed, then
    their mean with the standard deviation of one run, the mean's standard error and their range;
    with ``curves``, the set's curves.png. A page to paste into a README."""
    runs = summary.get("per_run") or []
    shown = [key for key in SEED_COLUMNS if summary.get(key)]  # None: not measured in every run
    on_val = "final_val_acc" in shown
    seed_list = summary.get("seeds") or []
    seeds = seeds_in_words(seed_list) if seed_list else "its seeds"

    def pct(key: str, stat: str) -> str:
        value = summary[key].get(stat)
        return "-" if value is None else f"{100 * value:.2f}"  # std and sem: none for one seed

    table = [["seed", *(SEED_COLUMNS[key] for key in shown)],
             *([str(run["seed"]), *(f"{100 * run[key]:.2f}" for key in shown)] for run in runs),
             ["mean ± std", *(pct(key, "mean") + ("" if summary[key]["std"] is None else f" ± {pct(key, 'std')}")
                              for key in shown)],
             ["standard error of the mean", *(pct(key, "sem") for key in shown)],
             ["min to max", *(f"{pct(key, 'min')} to {pct(key, 'max')}" for key in shown)]]
    epochs = summary.get("epochs", "?")
    lines = [f"# The recipe over {seeds}", "",
             f"`recipe.toml` trained once a seed, each run in its folder (`seedK/`): {epochs} "
             f"epoch{'' if epochs == 1 else 's'} on {summary.get('train_images', '?')} training images, "
             f"{summary.get('device', '?')}, {summary.get('precision', '?')}; {summary.get('total_seconds', '?')} s "
             "of runs in all. Only the last epoch of each run counts (no best epoch, no best seed); the standard "
             "deviation is one run's spread, the standard error the mean's (the standard deviation over the square "
             "root of the runs)."
             + (" Choose a setting on the validation accuracy (training images held out); report the test "
                "accuracy." if on_val else ""), "", *markdown_table(table), ""]
    if curves:
        lines += [f"![each seed's training loss and accuracy per epoch, and their mean]({CURVES_PNG})", ""]
    return "\n".join(lines)


# A curve: its label (None: none in the legend), epochs, training losses, accuracies (0..1) and
# matplotlib line style.
Curve = tuple[str | None, list[int], list[float], list[float], dict[str, Any]]


def plot_curve_pair(curves: list[Curve], loss_title: str, accuracy_title: str) -> Any:
    """Training loss (left) and accuracy in % (right) per epoch, a line a curve, the legend beside
    the accuracy; what a sweep's points and a set of seeds are both drawn with."""
    fig = new_figure((12, 4.5))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for label, epochs, losses, accuracies, style in curves:
        loss_ax.plot(epochs, losses, **style)
        acc_ax.plot(epochs, [100 * acc for acc in accuracies], label=label, **style)
    loss_ax.set(title=loss_title, xlabel="epoch", ylabel="cross-entropy loss")
    acc_ax.set(title=accuracy_title, xlabel="epoch", ylabel="accuracy (%)")
    for ax in (loss_ax, acc_ax):
        whole_epochs(ax)
        ax.grid(alpha=0.3)
    if any(label for label, *_ in curves):
        acc_ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    return say_when_empty(fig, not curves)


def plot_sweep_curves(plan: Plan, curves: dict[str, list[tuple[int, float, float]]], stats: dict[str, Any]) -> Any:
    """Each point's mean curves (``SweepFolder.mean_curves``) side by side: training loss and the
    selection split's accuracy per epoch, a line per point, the baseline's black and dashed; a point
    evaluated on the other split, its loss alone, so labelled."""
    words, _ = sweep_words(plan, stats["selection"])
    lines: list[Curve] = []
    for i, (name, rows) in enumerate(curves.items()):
        style = ({"color": "black", "ls": "--", "lw": 1.5} if name == stats["baseline"] else
                 {"color": f"C{i % 10}", "ls": "-" if i < 10 else ":", "lw": 1.2})
        label = f"{name} (baseline)" if name == stats["baseline"] else name
        if all(math.isnan(acc) for _, _, acc in rows):  # evaluated on the other split: not compared
            other = "test" if split_of(stats["selection"]) == "val" else "val"
            label += f" (loss only: evaluated on the {SPLIT_NAMES[other]} set)"
        lines.append((label, [epoch for epoch, _, _ in rows], [loss for _, loss, _ in rows],
                      [acc for _, _, acc in rows], {"marker": ".", **style}))
    seeds = seeds_in_words(plan.seed_range) if plan.seeds == 1 else f"mean over {seeds_in_words(plan.seed_range)}"
    shown = (f" (the first {MAX_CURVES} points with runs, of {len(plan.points)})"
             if len(curves) == MAX_CURVES < len(plan.points) else "")
    return plot_curve_pair(lines, f"Training loss, {seeds}", f"{words.capitalize()} accuracy{shown}")


# A set of seeds' picture draws the first seeds' own lines only (their mean counts them all): past
# a couple of dozen thin lines no colour tells them apart.
MAX_SEED_LINES = 20


def plot_seed_curves(histories: Mapping[int, Sequence[Any]]) -> Any:
    """One recipe's seeds side by side: each seed's training loss and accuracy on the split its
    epochs were evaluated on (test, or validation with a holdout), a thin line a seed (the first
    ``MAX_SEED_LINES``), and their mean in black (``mean_curve``, the sweep's too)."""
    seeds = sorted(histories)
    lines: list[Curve] = [(f"seed {seed}", [m.epoch for m in histories[seed]],
                           [m.train_loss for m in histories[seed]], [m.eval_acc for m in histories[seed]],
                           {"color": f"C{i % 10}", "lw": 0.8, "alpha": 0.7})
                          for i, seed in enumerate(seeds[:MAX_SEED_LINES])]
    mean = mean_curve(histories.values())
    lines.append((f"mean of {len(seeds)}", [epoch for epoch, _, _ in mean], [loss for _, loss, _ in mean],
                  [acc for _, _, acc in mean], {"color": "black", "lw": 2, "marker": "."}))
    split = SPLIT_NAMES[histories[seeds[0]][-1].split]
    named = seeds_in_words(seeds)
    shown = f" (lines: the first {MAX_SEED_LINES})" if len(seeds) > MAX_SEED_LINES else ""
    return plot_curve_pair(lines, f"Training loss, {named}", f"{split.capitalize()} accuracy{shown}")


def selection_rows(rows: list[dict[str, Any]], selection: str) -> dict[str, list[dict[str, Any]]]:
    """A sweep's rows that have the selection accuracy, by point (one pass: a plan may hold thousands)."""
    rows_of: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get(selection) is not None:
            rows_of.setdefault(r["point"], []).append(r)
    return rows_of


def plot_point_list(plan: Plan, rows_of: dict[str, list[dict[str, Any]]], stats: dict[str, Any]) -> Any:
    """A list sweep's picture: a line per point (the recipe itself on top; the first
    ``MAX_LIST_POINTS_DRAWN``), its selection accuracy a dot per seed and the mean with its
    standard error; the recipe's mean a dashed line."""
    selection = stats["selection"]
    by_name = {p["point"]: p for p in stats["points"]}
    points = plan.points[:MAX_LIST_POINTS_DRAWN]
    fig = new_figure((7.5, 1.5 + 0.32 * len(points)))
    ax = fig.subplots()
    labels = []
    for y, point in enumerate(points):
        point_rows = rows_of.get(point.name, [])
        ax.plot([100 * r[selection] for r in point_rows], [y] * len(point_rows), ".", color="C0", alpha=0.5)
        entry = by_name.get(point.name, {}).get(selection)
        if entry:
            ax.errorbar(100 * entry["mean"], y, xerr=100 * (entry["sem"] or 0.0), fmt="o", color="C0", capsize=3)
        found = [f"{k} {statistics.fmean(lrs):.3g}" for k, lrs in by_name.get(point.name, {}).get("found", {}).items()
                 if lrs]  # the LRs an auto point trained at, which its name does not say
        labels.append(point.name + (f" (found {', '.join(found)})" if found else ""))
    baseline = by_name.get(stats["baseline"] or "", {}).get(selection)
    if baseline:
        ax.axvline(100 * baseline["mean"], color="0.4", ls="--", lw=1)
    ax.set_yticks(range(len(points)), labels, fontsize="small")
    ax.invert_yaxis()
    words, title = sweep_words(plan, selection)
    if len(plan.points) > len(points):
        title += f"\nthe first {len(points)} of {len(plan.points)} points (all in sweep.csv and sweep.json)"
    ax.set(xlabel=f"final {words} accuracy (%)" + ("; dashed: the recipe's mean" if baseline else ""), title=title)
    ax.grid(alpha=0.3, axis="x")
    return fig
