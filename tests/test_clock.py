"""The time left that a run's epoch lines, a set of seeds' lines and a sweep's lines show: the
estimate, its wording, the seeds' loop and the sweep's two ways of training (in this process, and as
worker processes) on a clock of our own, and the epoch lines of a real tiny run."""
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

import cifar_onecycle.clock as clock
from cifar_onecycle import Interrupted, Recipe, sweep, train, train_seeds
from cifar_onecycle.clock import Laps, about_left, format_seconds, time_left
from cifar_onecycle.sweep import SweepFolder, run_workers
from cifar_onecycle.sweep_plan import Plan
from cifar_onecycle.training import RunOptions
from test_sweep import SMALL
from test_train import TINY

sweep_module = sys.modules["cifar_onecycle.sweep"]  # the package's `sweep` is the function


class FakeTime:
    """perf_counter and sleep on a clock that moves only when told to."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_the_time_left_is_the_median_piece_times_the_pieces_left_the_first_left_out():
    assert time_left([], 5) is None and time_left([10.0], 0) is None
    assert time_left([171.0], 3) == 513.0  # one piece done: the only measure there is
    assert time_left([171.0, 160.0, 500.0, 164.0], 2) == 328.0  # the first (a start's costs) left out
    assert time_left([50.0, 100.0], 3, at_once=2) == 200.0  # two at a time: 3 more take two rounds
    assert time_left([50.0, 100.0], 4, at_once=2) == 200.0


def test_durations_read_as_a_person_reads_them():
    assert [format_seconds(s) for s in (0.4, 45, 59.4, 59.6, 720, 3599, 3960, 7200)] == [
        "0 s", "45 s", "59 s", "1 min", "12 min", "1 h 00 min", "1 h 06 min", "2 h 00 min"]
    assert about_left([], 3) == "" and about_left([600.0], 2) == "about 20 min left"


def test_laps_time_each_piece_from_the_last(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(clock, "time", fake)
    laps = Laps()
    fake.now += 30
    laps.lap()
    fake.now += 12
    assert laps.lap() == [30.0, 12.0]


def test_a_sweep_in_this_process_says_how_long_its_runs_left_take(cifar_dir, tmp_path, monkeypatch, capsys):
    fake = FakeTime()
    monkeypatch.setattr(clock, "time", fake)
    took = iter([100.0, 60.0, 60.0])

    def stand_in_train(run_dir, recipe, data, options):
        fake.now += next(took)

    monkeypatch.setattr(sweep_module, "train_folder", stand_in_train)
    sweep(SMALL, {"lr_max": [0.01, 0.02, 0.04]}, 1, out=tmp_path / "sw", data_dir=cifar_dir, download=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sweep:")]
    assert lines == ["sweep: lr_max=0.01 seed 0 (1 of 3 left to train)",
                     "sweep: lr_max=0.02 seed 0 (2 of 3 left to train; about 3 min left)",  # 2 x 100 s
                     "sweep: lr_max=0.04 seed 0 (3 of 3 left to train; about 1 min left)"]  # 1 x 60 s


def test_a_set_of_seeds_says_how_long_its_seeds_left_take(cifar_dir, monkeypatch, capsys):
    fake = FakeTime()
    monkeypatch.setattr(clock, "time", fake)
    took = iter([100.0, 60.0])

    def stand_in_train(run_dir, recipe, data, options):
        if recipe.seed == 2:  # its line is out: enough
            raise Interrupted("stopped")
        fake.now += next(took)
        return SimpleNamespace(summary={"final_test_acc": 0.5, "final_test_acc_tta": 0.5})

    monkeypatch.setattr(sys.modules["cifar_onecycle.seeds"], "train_folder", stand_in_train)
    with pytest.raises(Interrupted):
        train_seeds(SMALL, 3, data_dir=cifar_dir, download=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seed ") and "(" in line]
    assert lines == ["seed 0 (1 of 3)", "seed 0: final test accuracy 50.00% (flip TTA 50.00%)",
                     "seed 1 (2 of 3; about 3 min left)", "seed 1: final test accuracy 50.00% (flip TTA 50.00%)",
                     "seed 2 (3 of 3; about 1 min left)"]


def test_a_sweeps_workers_say_how_long_the_runs_left_take(tmp_path, monkeypatch, capsys):
    """Stand-in workers that each take 100 s on a clock of our own, two at a time."""
    fake = FakeTime()
    monkeypatch.setattr(sweep_module, "time", fake)
    ended: set[str] = set()

    class HundredSeconds:
        def __init__(self, command, **kwargs):
            self.out, self.started = command[command.index("--out") + 1], fake.now

        def poll(self):
            if fake.now - self.started < 100:
                return None
            ended.add(self.out)
            return 0

    monkeypatch.setattr(subprocess, "Popen", HundredSeconds)
    monkeypatch.setattr(SweepFolder, "status", lambda self, point, seed: (
        "finished" if str(self.run(point, seed).path.resolve()) in ended else "new"))
    plan = Plan({"lr_max": [0.01, 0.02, 0.04, 0.08, 0.16]}, first_seed=0, seeds=1)
    run_workers(SweepFolder(tmp_path / "sw"), list(plan.runs()), 2, RunOptions(), True, lambda: None)
    started = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if "started" in line]
    assert started == [
        "lr_max=0.01 seed 0 started (worker 0)", "lr_max=0.02 seed 0 started (worker 1)",
        # two ended in 100 s each; 3 runs left (those starting included), 2 at a time: two rounds of
        # 100 s; the last alone: one
        "lr_max=0.04 seed 0 started (worker 0); about 3 min left",
        "lr_max=0.08 seed 0 started (worker 1); about 3 min left",
        "lr_max=0.16 seed 0 started (worker 0); about 2 min left"]
    assert len(ended) == 5


@pytest.mark.slow
def test_each_epoch_line_but_the_last_says_how_long_the_run_has_left(cifar_dir, capsys):
    train(Recipe(**{**TINY, "epochs": 3}), data_dir=cifar_dir, download=False)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3
    assert all(re.search(r"img/s  about \d+ s left$", line) for line in lines[:2]), lines
    assert lines[2].endswith("img/s"), lines[2]
    # Before the first epoch's line, its progress bar says it, from the steps so far, first after the
    # speed (a terminal of 80 columns cuts the bar's end); then only the lines.
    bars = [bar for bar in re.split(r"[\r\n]", captured.err) if bar.startswith("epoch ")]
    first = [bar for bar in bars if bar.startswith("epoch 1/3")]
    assert any(re.search(r"step/s, run=about \d+ s left, lr=", bar) for bar in first), bars
    assert not any("run=" in bar for bar in bars if not bar.startswith("epoch 1/3")), bars
