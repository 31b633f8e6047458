"""What a sweep trains: a grid of settings (every combination of their values) or a list of points
(the recipe itself first, then each change to it), over the same seeds; from the command line
(``--vary``, ``--point``, ``--baseline``) or from a sweep folder's sweep_plan.json, which may be
someone else's: checked, and bounded, before any run (``Plan.check``).
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .errors import RecipeError, UserError, as_setting
from .files import parse_json
from .recipe import DATA_FIELDS, Recipe, check_seed_range

AUTO = "auto"
AUTO_SETTINGS = ("lr_max", "lr_min")   # the settings the LR range test can find
LOG_SETTINGS = ("lr_max", "lr_min", "weight_decay")  # drawn on a log axis
NOT_VARIED = ("seed",)                 # the seeds are the sweep's other dimension
# The data is read once for the whole sweep: what decides it is the same at every point.
DATA_SETTINGS = ("dataset", "skip_bad_images", *DATA_FIELDS)
# A plan may come from someone else's folder: it must not decide how much work or memory a sweep takes.
MAX_RUNS = 10_000
UNVARIED = (*DATA_SETTINGS, *NOT_VARIED)
KINDS = {f.name: str(f.type) for f in fields(Recipe)}
KIND_WORDS = {"int": "an int", "float": "a float", "bool": "a bool (true or false)", "str": "a str"}
# Settings that change only the evaluation at a run's end when the recipe has no per-epoch TTA
# (which they would change too): a point that differs from another in these alone is not trained.
EVALUATION_ONLY = ("tta_translate",)


def format_value(value: Any) -> str:
    """A value as folder names, the csv and the command line write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def check_variable(setting: str, what: str = "vary") -> None:
    """Refuse a setting that a sweep cannot vary (``what``: the flag or plan field that names it)."""
    if setting not in KINDS:
        raise UserError(f"{as_setting(what)}: unknown setting {setting!r}; any recipe setting can be varied but "
                        f"the data's and the seed: {', '.join(k for k in KINDS if k not in UNVARIED)}")
    if setting in DATA_SETTINGS:
        raise UserError(f"{as_setting(what)}: {setting} is not varied: a sweep reads its data once; run a "
                        f"sweep for each data set")
    if setting in NOT_VARIED:
        raise UserError(f"{as_setting(what)}: seed is not varied: every point trains the same seeds, from "
                        f"the recipe's seed on")


def parse_value(setting: str, text: str, what: str = "vary") -> Any:
    """A value of ``setting`` from its text (``auto`` where the range test can find the setting)."""
    check_variable(setting, what)
    if text == AUTO and setting in AUTO_SETTINGS:
        return AUTO
    kind = KINDS[setting]
    try:
        if kind == "bool":
            if text not in ("true", "false"):
                raise ValueError(text)
            return text == "true"
        return {"int": int, "float": float, "str": str}[kind](text)
    except ValueError:
        auto = " or auto" if setting in AUTO_SETTINGS else ""
        raise UserError(f"{as_setting(what)}: {setting}={text}: not {KIND_WORDS[kind]}{auto}") from None


def parse_vary(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr_max=0.1,0.2,auto", "flip=true,false"]`` as {setting: values}, one axis per item."""
    vary: dict[str, list[Any]] = {}
    for spec in specs:
        setting, _, values = spec.partition("=")
        setting = setting.strip().replace("-", "_")
        if not values:
            raise UserError(f"{as_setting('vary')}: {spec!r} is not SETTING=VALUE,VALUE,...")
        if setting in vary:
            raise UserError(f"{as_setting('vary')}: {setting} is given twice; list all its values in one")
        vary[setting] = [parse_value(setting, v.strip()) for v in values.split(",")]
    return vary


def parse_point(spec: str, what: str = "baseline") -> dict[str, Any]:
    """``"lr_max=0.2,flip=true"``: one value for each named setting (a baseline, or a ``point``)."""
    point: dict[str, Any] = {}
    for item in spec.split(","):
        setting, sep, value = item.partition("=")
        setting = setting.strip().replace("-", "_")
        if not sep or setting in point:
            raise UserError(f"{as_setting(what)}: {spec!r} is not SETTING=VALUE,SETTING=VALUE (each setting once)")
        point[setting] = parse_value(setting, value.strip(), what)
    return point


RECIPE_POINT = "recipe"  # the name of a list's first point, the recipe itself


@dataclass(frozen=True)
class Point:
    """One point of the sweep: a value for each setting it changes, in the order they were given
    (every varied setting in a grid; none for the recipe itself, a list's first point)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """Its folder's name: ``lr_max=0.1`` or ``lr_max=0.1,flip=false``; ``recipe`` for no change."""
        return ",".join(f"{k}={format_value(v)}" for k, v in self.values) or RECIPE_POINT

    @property
    def found(self) -> tuple[str, ...]:
        """The settings the range test finds at this point."""
        return tuple(k for k, v in self.values if v == AUTO)

    def recipe(self, base: Recipe, seed: int) -> Recipe:
        """The recipe of this point's run with ``seed``, as ``cifar-onecycle train --recipe BASE`` with
        this point's flags makes it: a given LRMIN replaces one derived from LRMAX, and a new number
        of epochs keeps the recipe's shape unless the peak epoch is varied too."""
        given = {k: v for k, v in self.values if v != AUTO}
        if "lr_min" in given:
            given["lr_min_div"] = 0.0
        epochs = given.pop("epochs", None) if "peak_epoch" not in given else None
        recipe = Recipe.from_dict({**base.to_dict(), **given, "seed": seed}, source=f"sweep point {self.name}")
        return recipe.with_epochs(epochs) if epochs is not None else recipe

    def flags(self) -> list[str]:
        """This point's ``train`` flags."""
        out: list[str] = []
        for k, v in self.values:
            flag = "--" + k.replace("_", "-")
            out += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, format_value(v)]
        return out


@dataclass(frozen=True)
class Plan:
    """What a sweep is: the settings varied with their values (a grid), or a list of points (the
    recipe itself first: ``listed``, each point the settings it changes); the seeds; the baseline
    point (a list's is the recipe itself)."""

    vary: dict[str, list[Any]]
    first_seed: int
    seeds: int
    baseline: dict[str, Any] | None = None
    listed: list[dict[str, Any]] | None = None

    @property
    def points(self) -> list[Point]:
        if self.listed is not None:
            return [Point(()), *(Point(tuple(values.items())) for values in self.listed)]
        names = list(self.vary)
        return [Point(tuple(zip(names, values, strict=True))) for values in itertools.product(*self.vary.values())]

    @property
    def settings(self) -> list[str]:
        """The settings the points change, in the order first given: sweep.csv's columns."""
        if self.listed is None:
            return list(self.vary)
        return list(dict.fromkeys(k for values in self.listed for k in values))

    @property
    def seed_range(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)

    def runs(self) -> list[tuple[int, Point]]:
        """(seed, point) in the order they train: seed by seed, every point of a seed in grid order."""
        return [(seed, point) for seed in self.seed_range for point in self.points]

    def trained_as(self, base: Recipe) -> dict[Point, Point]:
        """Each point that trains exactly as an earlier one (it differs only in ``EVALUATION_ONLY``
        settings, and neither has per-epoch TTA nor a setting the range test finds), with the first
        such point: its runs are that point's weights evaluated again (``evaluate_as``)."""
        first: dict[Recipe, Point] = {}
        twins: dict[Point, Point] = {}
        for point in self.points:
            if point.found:
                continue
            recipe = point.recipe(base, self.first_seed)
            training = recipe.replace(**{k: getattr(base, k) for k in EVALUATION_ONLY})
            if not recipe.tta and training in first:
                twins[point] = first[training]
            else:
                first.setdefault(training, point)
        return twins

    @property
    def baseline_point(self) -> Point | None:
        if self.listed is not None:
            return Point(())
        if self.baseline is None:
            return None
        return Point(tuple((k, self.baseline[k]) for k in self.vary))

    def check(self, base: Recipe) -> None:
        """Refuse a plan that cannot run: an unknown or repeated setting, a value the recipe refuses,
        a listed point that is another's or the recipe's own, too many runs, a baseline that is not a
        point of the grid."""
        what = "vary" if self.listed is None else "point"
        if self.listed is not None and (self.vary or self.baseline is not None):
            raise UserError(f"{as_setting('point')}: a sweep is a grid ({as_setting('vary')}) or a list of points "
                            f"compared with the recipe itself; give one, and no {as_setting('baseline')} with a list")
        if not (self.listed or self.vary):
            raise UserError(f"{as_setting(what)}: give at least one setting to vary (SETTING=VALUE,VALUE,...) or "
                            f"point (SETTING=VALUE,...)")
        for setting in self.settings:
            check_variable(setting, what)
        for setting, values in self.vary.items():
            if not values or len({format_value(v) for v in values}) != len(values):
                raise UserError(f"{as_setting('vary')}: {setting} needs distinct values, got "
                                f"{[format_value(v) for v in values]}")
        check_seed_range(self.first_seed, self.seeds)
        count = math.prod(len(v) for v in self.vary.values()) if self.listed is None else 1 + len(self.listed)
        if count * self.seeds > MAX_RUNS:
            raise UserError(f"{as_setting(what)}: {count} points x {self.seeds} {as_setting('seeds')} is more "
                            f"than {MAX_RUNS} runs")
        listed = self.listed or []
        if any("lr_min" in keys and "lr_min_div" in keys for keys in [*listed, self.vary]):
            raise UserError(f"{as_setting(what)}: lr_min and lr_min_div both set LRMIN; set one")
        seen: set[frozenset[tuple[str, Any]]] = set()
        for change in listed:
            if not change or all(v != AUTO and getattr(base, k) == v for k, v in change.items()):
                raise UserError(f"{as_setting('point')} {format_point(change)}: changes nothing in the recipe, whose "
                                f"own point every list trains first; leave it out")
            if frozenset(change.items()) in seen:
                raise UserError(f"{as_setting('point')} {format_point(change)}: given twice")
            seen.add(frozenset(change.items()))
        for point in self.points:
            try:
                point.recipe(base, self.first_seed)
            except RecipeError as e:
                raise UserError(f"{as_setting(what)}: {e}") from None
        if self.listed is None and self.baseline is not None and (
                set(self.baseline) != set(self.vary) or self.baseline_point not in set(self.points)):
            raise UserError(f"{as_setting('baseline')} {format_point(self.baseline)} is not a point of the sweep: "
                            f"give one value of "
                            f"each varied setting ({', '.join(self.vary)}) from its values")

    def to_json(self) -> str:
        return json.dumps({"vary": self.vary, "first_seed": self.first_seed, "seeds": self.seeds,
                           "baseline": self.baseline, **({"points": self.listed} if self.listed is not None else {})},
                          indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> Plan:
        """A plan as ``to_json`` wrote it; anything else is refused (``Plan.check`` then bounds it)."""
        try:
            raw = parse_json(text)
            vary, baseline, listed = raw["vary"], raw["baseline"], raw.get("points")
            if not (isinstance(vary, dict) and all(isinstance(v, list) and len(v) <= MAX_RUNS for v in vary.values())
                    and (baseline is None or isinstance(baseline, dict))):
                raise TypeError("vary must map settings to lists of values")
            if listed is not None and not (isinstance(listed, list) and len(listed) <= MAX_RUNS
                                           and all(isinstance(p, dict) for p in listed)):
                raise TypeError("points must be a list of settings and their values")
            first, seeds = raw["first_seed"], raw["seeds"]
            if not (type(first) is int and type(seeds) is int):
                raise TypeError("first_seed and seeds must be integers")
            vary = {k: [_from_json_value(k, v) for v in values] for k, values in vary.items()}
            baseline = None if baseline is None else {k: _from_json_value(k, v) for k, v in baseline.items()}
            if listed is not None:
                listed = [{k: _from_json_value(k, v) for k, v in p.items()} for p in listed]
        except (ValueError, KeyError, TypeError) as e:  # parse_json bounds the nesting
            raise UserError(f"{source}: not a sweep plan ({type(e).__name__}: {e})") from None
        return cls(vary, first, seeds, baseline, listed)


def _from_json_value(setting: str, value: Any) -> Any:
    kind = KINDS.get(setting)
    if kind is None:
        raise KeyError(f"unknown setting {setting!r}")
    ok = (value == AUTO and setting in AUTO_SETTINGS or kind == "bool" and isinstance(value, bool)
          or kind == "int" and type(value) is int or kind == "float" and type(value) in (int, float)
          or kind == "str" and isinstance(value, str))
    if not ok:
        raise TypeError(f"{setting}: {value!r} is not a {kind}")
    return float(value) if kind == "float" and type(value) is int else value


def format_point(values: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in values.items())
