"""The run folder: every file a run leaves, written atomically through one object.

    recipe.toml        the resolved recipe (rerun it with --recipe)
    metrics.csv        a row per epoch
    checkpoint.pt      the state after the last finished epoch, or where a stop signal caught the run;
                       removed as the run ends unless it is asked to be kept
    model.safetensors  the delivered weights, with the recipe in their metadata
    summary.json       the final numbers and their provenance
    report.md, *.png   the report (``report.write_report``); lr_find.json and graphs with an LR range test
    seeds.json         in the folder of a multi-seed run only, beside its seed<k>/ run folders
    failed.json        only in a run that cannot go on: its loss was not finite (diverged), or the LR
                       range test found no value for a setting given as auto; a sweep records it and
                       does not train it again
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT, WEIGHTS, load_checkpoint, save_checkpoint, save_weights
from .errors import UserError, as_setting
from .files import MAX_TEXT_BYTES, FolderLock, atomic_write, parse_json, read_capped, refuse_a_file, writable_folder
from .recipe import SEEDS_END, Recipe, load_recipe
from .results import EpochMetrics, check_run_summary, metrics_csv, parse_metrics_csv

RECIPE, METRICS, SUMMARY, SEEDS, FAILED = "recipe.toml", "metrics.csv", "summary.json", "seeds.json", "failed.json"
SWEEP_PLAN = "sweep_plan.json"  # what makes a folder a sweep's (sweep.py writes and reads it)
RUN_FILES = (RECIPE, METRICS, SUMMARY, SEEDS, WEIGHTS, CHECKPOINT, FAILED)
# The files other modules write into a run's folder: the report (report.write_report) and the LR range
# test's (lr_finder.write_lr_find). An overwrite removes them with the run's own, so that none of an
# earlier run's stays beside the new one's (its report.md would show the earlier run's range test).
REPORT_MD, CURVES_PNG, LR_SCHEDULE_PNG, CONFUSION_PNG, MISCLASSIFIED_PNG, GRADCAM_PNG, AUGMENT_PNG = (
    "report.md", "curves.png", "lr_schedule.png", "confusion.png", "misclassified.png", "gradcam.png", "augment.png")
LR_FIND_JSON = "lr_find.json"
LR_FIND_PNGS = {"exp": "lr_find_exp.png", "linear": "lr_find_linear.png"}  # by the range test's mode
SEEDS_MD = "seeds.md"  # a set of seeds' page (seeds.write_seeds_results); its curves.png is CURVES_PNG
REPORT_FILES = (REPORT_MD, CURVES_PNG, LR_SCHEDULE_PNG, CONFUSION_PNG, MISCLASSIFIED_PNG, GRADCAM_PNG, AUGMENT_PNG,
                LR_FIND_JSON, *LR_FIND_PNGS.values(), SEEDS_MD)
TENSORBOARD = "tensorboard"  # the folder of a run's TensorBoard event files (``--tensorboard``)
FAILURES = ("diverged", "no LR found")  # why a run cannot go on


class RunFolder:
    """One run's folder. ``create`` makes a new one; the constructor opens an existing one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def inside(cls, parent: str | Path, *names: str) -> RunFolder:
        """The run folder ``parent/names...`` of a set of runs (a seed of ``--seeds``, a sweep's point
        and seed), refusing a link on the way: the set's folder may be someone else's, and a planted
        link would send this run's writes (and its removal of stale temporary files) elsewhere."""
        path = Path(parent)
        for name in names:
            path = path / name
            if path.is_symlink():
                raise UserError(f"{path}: a link, not a folder of the runs in {parent}; remove it, or run "
                                f"in another folder")
        return cls(path)

    def set_of_runs(self) -> str | None:
        """"a sweep" or "a set of seeds" when the folder is one's (its sweep_plan.json or seeds.json
        is there), else None. OSErrors propagate (a name too long)."""
        if (self.path / SWEEP_PLAN).exists():
            return "a sweep"
        return "a set of seeds" if (self.path / SEEDS).exists() else None

    def check_usable(self, resume: bool = False) -> None:
        """Refuse, saying what to give or do instead, a folder that is not one run to use (or, with
        ``resume``, to go on with): a set of runs (a set of seeds', which is resumed as a set
        elsewhere; a sweep's, by its own command), a run that failed, and, to use, a run stopped
        before its end. A run with weights passes, and so does a weights file."""
        kind = self.set_of_runs()
        if kind == "a set of seeds":
            try:
                first = f"seed{self.read_seeds()[0]}"
            except UserError:  # a damaged seeds.json: the example is only an example
                first = "seed0"
            raise UserError(f"{self.path}: a folder of a run per seed ({first}/ and on), not one run's; give one of "
                            f"them, such as {self.path / first}")
        if kind == "a sweep":
            raise UserError(f"{self.path}: a sweep's folder (a run per point and seed, POINT/seed<k>/, listed in its "
                            f"sweep.csv), not one run's; "
                            + ("to go on with the sweep, run the same cifar-onecycle sweep command again" if resume
                               else "give one of its runs"))
        if self.has(WEIGHTS):
            return
        if self.has(FAILED):
            reason, message = self.read_failed()
            raise UserError(f"{self.path}: this run failed ({reason}: {message})"
                            + ("; it would fail again: start a new run" if resume else "; it left no weights"))
        if self.has(CHECKPOINT) and not resume:
            raise UserError(f"{self.path}: this run has not finished (a checkpoint, no weights yet); go on with it: "
                            f"cifar-onecycle train --resume {self.path}")

    def check_range_test_replaceable(self) -> None:
        """Refuse this folder for a range test's files (``lr-find --out``) when it holds a run and a range
        test already: the run's own (``auto``), which its summary.json and report.md describe, or one
        kept beside it; a new test would replace it under the run's name. A run alone (a range test
        added beside it) and an earlier range test alone (done again) pass."""
        try:
            runs = [name for name in RUN_FILES if self.has(name)]
            tested = [name for name in (LR_FIND_JSON, *LR_FIND_PNGS.values()) if (self.path / name).exists()]
        except OSError as e:  # a name too long, a folder that cannot be searched
            raise UserError(f"{as_setting('out')} {self.path}: cannot use it ({e.strerror or e}); choose another "
                            f"folder") from None
        if runs and tested:
            raise UserError(f"{as_setting('out')} {self.path}: holds a run ({runs[0]}) and its range test "
                            f"({tested[0]}), which this one would replace; choose another folder")

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False, set_of_seeds: bool = False,
               held: ExitStack | None = None) -> RunFolder:
        """Create ``path``, refusing one that holds another run unless ``overwrite`` (which removes
        the old run's files, its report's and its TensorBoard events, never a folder: a stale one must
        not pass for the new run's); check it is writable. A sweep's folder is refused, and so is a
        set of seeds' unless ``set_of_seeds`` (the folder of a new set): an overwrite would leave the
        set's runs beside the new run. ``held``: the folder is held (``FolderLock``) in that stack
        from before anything is removed, and one another process holds is refused."""
        path = Path(path)
        try:
            refuse_a_file(path)
            taken = [name for name in (*RUN_FILES, *REPORT_FILES)
                     if (path / name).exists() or (path / name).is_symlink()]
            folders = [name for name in taken if (path / name).is_dir() and not (path / name).is_symlink()]
            a_set = cls(path).set_of_runs()
        except OSError as e:  # a name too long, a folder that cannot be searched
            raise UserError(f"{as_setting('out')} {path}: cannot use it ({e.strerror or e}); choose another "
                            f"folder") from None
        if a_set and not (a_set == "a set of seeds" and set_of_seeds):
            raise UserError(f"{as_setting('out')} {path}: holds {a_set}, not a run; choose another folder"
                            + (f" ({as_setting('overwrite')} replaces a run's files, not a set's runs)" if overwrite
                               else ""))
        runs = [name for name in taken if name in RUN_FILES]
        if runs and not overwrite:
            raise UserError(f"{as_setting('out')} {path}: already holds a run ({runs[0]}); choose another folder "
                            f"or pass {as_setting('overwrite')}")
        if folders:  # not a file any run writes: someone else's, never removed for them
            raise UserError(f"{as_setting('out')} {path}: {folders[0]} there is a folder, not a run's file; "
                            f"remove it yourself or choose another folder")
        writable_folder(path)
        if held is not None:
            held.enter_context(FolderLock(path, "out"))
        for name in taken if overwrite else ():
            (path / name).unlink()
        board = path / TENSORBOARD
        if overwrite and board.is_dir() and not board.is_symlink():  # else TensorBoard draws both runs as one
            for events in board.glob("events.out.tfevents.*"):
                if events.is_file() or events.is_symlink():
                    events.unlink()
        return cls(path)

    def remove_interrupted_writes(self) -> None:
        """Temporary files of writes killed before their rename (never a file of the run; a folder
        of such a name is not one of them, and is left alone)."""
        for stale in self.path.glob(".*.tmp"):
            if stale.is_file() or stale.is_symlink():
                stale.unlink(missing_ok=True)

    def _read_text(self, name: str) -> str:
        return read_capped(self.path / name, MAX_TEXT_BYTES, f"{name} of a run", "is this a run folder?").decode()

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def write_recipe(self, recipe: Recipe) -> None:
        atomic_write(self.path / RECIPE, recipe.to_toml())

    def read_recipe(self) -> Recipe:
        return load_recipe(self.path / RECIPE)

    def write_metrics(self, history: list[EpochMetrics]) -> None:
        atomic_write(self.path / METRICS, metrics_csv(history))

    def read_metrics(self) -> list[EpochMetrics]:
        try:
            history = parse_metrics_csv(self._read_text(METRICS))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path / METRICS}: not a run's metrics ({e})") from None
        if not history:
            raise UserError(f"{self.path / METRICS}: no epochs recorded")
        return history

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict[str, Any]:
        """A finished run's summary, checked (``check_run_summary``) before anyone reads it."""
        try:
            summary = parse_json(self._read_text(SUMMARY))
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
            check_run_summary(summary)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path / SUMMARY}: not a finished run's summary ({e})") from None
        return summary

    def write_failed(self, reason: str, message: str) -> None:
        atomic_write(self.path / FAILED, json.dumps({"reason": reason, "message": message}) + "\n")

    def read_failed(self) -> tuple[str, str]:
        """Why a run cannot go on: (one of ``FAILURES``, its error message)."""
        try:
            record = parse_json(self._read_text(FAILED))
            reason, message = record["reason"], record["message"]
            if reason not in FAILURES or not isinstance(message, str):
                raise TypeError(f"reason {reason!r} or message is not one this program writes")
            return reason, message
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path / FAILED}: not a failed run's record ({e})") from None

    def save_weights(self, model: torch.nn.Module, recipe: Recipe) -> None:
        save_weights(model, self.path / WEIGHTS, recipe)

    def save_checkpoint(self, state: dict[str, Any]) -> Path:
        save_checkpoint(self.path / CHECKPOINT, state)
        return self.path / CHECKPOINT

    def remove_checkpoint(self) -> None:
        (self.path / CHECKPOINT).unlink(missing_ok=True)

    def load_checkpoint(self) -> tuple[dict[str, Any], Recipe]:
        return load_checkpoint(self.path / CHECKPOINT)

    def write_seeds(self, first_seed: int, seeds: int, data_dir: str | None) -> None:
        atomic_write(self.path / SEEDS, json.dumps({"first_seed": first_seed, "seeds": seeds,
                                                    "data_dir": data_dir}) + "\n")

    def read_seeds(self) -> tuple[int, int, str | None]:
        """(first seed, number of seeds, data folder) of a multi-seed run."""
        try:
            info = parse_json(self._read_text(SEEDS))
            first, count, data_dir = int(info["first_seed"]), int(info["seeds"]), info.get("data_dir")
            if not (0 <= first < SEEDS_END and 1 <= count <= SEEDS_END - first):
                raise ValueError(f"seeds {count} from seed {first} is not a range of seeds")
            if not isinstance(data_dir, (str, type(None))):
                raise TypeError(f"data_dir {data_dir!r} is not a folder's name")
            return first, count, data_dir
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{as_setting('resume')} {self.path}: not a multi-seed run folder ({SEEDS}: {e})") from None
