"""Checkpoints and resume: SIGKILL at several points (one of them inside the checkpoint write),
SIGINT, and checkpoints that are hostile, foreign or for another run."""
import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cifar_onecycle import Recipe, UserError, train
from cifar_onecycle.checkpoint import load_checkpoint, save_checkpoint
from cifar_onecycle.cli import main
from conftest import Payload, recipe_flags

# Four steps of 10 images an epoch, from a subset of 40 (test_train.py's TINY, a third epoch more)
RECIPE = Recipe(epochs=3, peak_epoch=1, batch_size=10, train_subset=40, eval_batch_size=16, device="cpu",
                precision="fp32", lr_max=0.02, logit_scale=0.125, bn_momentum=0.5)
FLAGS = recipe_flags(RECIPE)
TIMING = {"train_seconds", "images_per_second"}

# Run the CLI; with HANG_ON_CHECKPOINT_FSYNC=N, the N-th fsync of a checkpoint's temporary file
# touches a marker and hangs there, so the test can kill the process in the middle of the write.
# Signals at an exact step come from the library's test hook (CIFAR_ONECYCLE_TEST_SIGNALS).
RUNNER = """
import os, sys, time
n = int(os.environ.get("HANG_ON_CHECKPOINT_FSYNC", "0"))
if n:
    real, seen = os.fsync, []
    def fsync(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            seen.append(fd)
            if len(seen) == n:
                open(os.environ["MARKER"], "w").close()
                time.sleep(600)
        real(fd)
    os.fsync = fsync
from cifar_onecycle.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start(args, **env):
    return subprocess.Popen([sys.executable, "-c", RUNNER, "train", *args, "--quiet"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_with_signals(data: Path, run: Path, signals: str):
    """A training run into ``run`` that sends itself ``signals`` (the library's test hook); its exit
    code and stderr."""
    p = start(["--data-dir", str(data), "--no-download", *FLAGS, "--out", str(run)],
              CIFAR_ONECYCLE_TEST_SIGNALS=signals)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def metrics(run: Path):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader((run / "metrics.csv").open())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the same recipe."""
    from conftest import write_cifar

    root = tmp_path_factory.mktemp("resume")
    data = write_cifar(root / "data").parent
    train(RECIPE, data_dir=data, download=False, out=root / "ref", progress=False, keep_checkpoint=True)
    return data, root / "ref"


def assert_same_run(run: Path, ref: Path):
    assert metrics(run) == metrics(ref)
    a, b = load_file(run / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_is_bit_identical(reference, tmp_path):
    data, ref = reference
    run, marker = tmp_path / "run", tmp_path / "in-write"
    args = ["--data-dir", str(data), "--no-download", *FLAGS]
    # 1. killed in the middle of epoch 2, a moment after the first checkpoint
    p = start([*args, "--out", str(run)])
    wait_for(run / "checkpoint.pt", p)
    time.sleep(0.7)
    p.kill()
    p.wait()
    assert load_checkpoint(run / "checkpoint.pt")[0]["epoch"] >= 1
    # 2. killed inside the checkpoint write (after its temporary file is written, before the rename)
    p = start(["--resume", str(run)], HANG_ON_CHECKPOINT_FSYNC="1", MARKER=str(marker))
    wait_for(marker, p)
    before = load_checkpoint(run / "checkpoint.pt")[0]["epoch"]
    p.kill()
    p.wait()
    assert list(run.glob(".checkpoint.pt.*.tmp"))                      # the interrupted write
    assert load_checkpoint(run / "checkpoint.pt")[0]["epoch"] == before  # the old checkpoint, whole
    # 3. killed early, while starting up
    p = start(["--resume", str(run)])
    time.sleep(1.0)
    p.kill()
    p.wait()
    # 4. resumed to the end
    p = start(["--resume", str(run)])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert not list(run.glob(".*.tmp"))
    assert_same_run(run, ref)


# SIGINT mid-epoch is the sweep's and the second signal's test's (14 s a case on an AVX2-only CPU)
@pytest.mark.parametrize("signal, at_step, where", [("SIGINT", 7, "after epoch 2"),
                                                     ("SIGTERM", 5, "in epoch 2 after step 6")])
@pytest.mark.slow
def test_a_stop_signal_checkpoints_and_says_how_to_resume(reference, tmp_path, signal, at_step, where):
    data, ref = reference
    run = tmp_path / "run"
    code, err = run_with_signals(data, run, f"{signal}@{at_step}")
    assert code == 130, err
    assert f"stopped by {signal} {where}" in err, err  # 4 steps an epoch: step 6 is mid-epoch, 7 its last
    assert f"resume with: cifar-onecycle train --resume {run}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (run / "model.safetensors").exists()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # the data folder comes from the checkpoint
    assert_same_run(run, ref)


@pytest.mark.slow
def test_a_stop_signal_during_an_evaluation_is_honoured_there(reference, tmp_path):
    data, ref = reference
    run = tmp_path / "run"
    # arrives as epoch 2's evaluation begins: the run must not wait for the evaluation (a minute on
    # a slow CPU) nor train on into epoch 3
    code, err = run_with_signals(data, run, "SIGTERM@eval2")
    assert code == 130, err
    assert "stopped by SIGTERM during the evaluation of epoch 2" in err and len(err.strip().splitlines()) == 1, err
    saved = load_checkpoint(run / "checkpoint.pt")[0]
    assert (saved["epoch"], saved["batch"]) == (1, 4)  # epoch 2 trained (4 steps), its evaluation pending
    assert len(metrics(run)) == 1
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(run, ref)


@pytest.mark.parametrize("signal, code", [("SIGINT", 130), ("SIGTERM", -15)])
@pytest.mark.slow
def test_a_stop_signal_while_loading_the_data_stops_at_once(tmp_path, signal, code):
    from conftest import write_cifar

    data = write_cifar(tmp_path / "data").parent
    run = tmp_path / "run"
    returncode, err = run_with_signals(data, run, f"{signal}@load")
    # nothing to save yet: SIGINT ends the command (exit code 130), SIGTERM kills the process
    assert returncode == code, err
    assert "Traceback" not in err and not run.exists()


@pytest.mark.slow
def test_a_second_signal_stops_at_once(reference, tmp_path):
    data, ref = reference
    run = tmp_path / "run"
    # both arrive as step 6 begins: the first asks for a checkpoint at the end of the step, the
    # second does not wait for it
    code, err = run_with_signals(data, run, "SIGTERM@6,SIGINT@6")
    assert code == 130 and "interrupted" in err and "checkpoint saved" not in err, err
    assert load_checkpoint(run / "checkpoint.pt")[0]["epoch"] == 1  # epoch 1's, untouched
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(run, ref)


@pytest.mark.slow
@pytest.mark.parametrize("lookahead", [False, True])
def test_resume_with_a_weight_average_and_a_cycling_momentum_is_bit_identical(tmp_path, lookahead):
    # The per-step state beside the weights: the average, and the momentum the optimizer was left at.
    from conftest import write_cifar

    data = write_cifar(tmp_path / "data").parent
    ema = ["--ema-decay", "0.9", "--ema-every", "3", "--tta", *(["--ema-lookahead"] if lookahead else []),
           "--momentum-at-peak", "0.8"]
    train(RECIPE.replace(ema_decay=0.9, ema_every=3, tta=True, ema_lookahead=lookahead, momentum_at_peak=0.8),
          data_dir=data, download=False, out=tmp_path / "ref", progress=False, report=False)
    run = tmp_path / "run"
    p = start(["--data-dir", str(data), "--no-download", *FLAGS, *ema, "--out", str(run)],
              CIFAR_ONECYCLE_TEST_SIGNALS="SIGINT@6")
    assert p.wait(timeout=120) == 130
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(run, tmp_path / "ref")
    assert "test_acc_tta" in (run / "metrics.csv").read_text().splitlines()[0]


def test_the_loss_scalers_state_goes_into_the_checkpoint_and_comes_back():
    # fp16 (a GPU without bf16) trains through a loss scaler whose scale and growth count are state
    # of the run: a resumed run must take them up, not start them again. fp16 itself is CUDA's (the
    # CLI refuses it on a CPU); the scaler is the same on the CPU, so a CPU scaler stands in for it.
    from dataclasses import replace

    from cifar_onecycle.data import Cifar10
    from cifar_onecycle.run_setup import setup_run
    from cifar_onecycle.state import TrainState

    data = Cifar10(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.arange(40) % 10,
                   torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10))

    def with_scaler(init_scale):
        setup = setup_run(RECIPE, data)
        return replace(setup, scaler=torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=5))

    trained = with_scaler(1024.0)
    order = trained.shuffle()
    for step in range(3):
        batch = order[10 * step:10 * step + 10]
        trained.step(trained.train_images[batch].float() / 255, trained.train_labels[batch], 0.01)
    checkpoint = TrainState().to_checkpoint(trained)
    assert checkpoint["scaler"]["_growth_tracker"] == 3 and checkpoint["scaler"]["scale"] == 1024.0
    resumed = with_scaler(65536.0)
    TrainState.from_checkpoint(checkpoint, resumed)
    assert resumed.scaler.state_dict() == trained.scaler.state_dict()
    assert TrainState().to_checkpoint(setup_run(RECIPE, data))["scaler"] is None  # fp32: no scaler to keep


def test_resume_refuses_recipe_changes_and_finished_runs(reference, tmp_path, capsys):
    data, ref = reference
    killed = tmp_path / "killed"  # between its last checkpoint and its summary: a resume finishes it,
    shutil.copytree(ref, killed)  # with its own recipe
    (killed / "summary.json").unlink()
    assert main(["train", "--resume", str(killed), "--epochs", "5"]) == 2
    assert "epochs would change from 3 to 5" in capsys.readouterr().err
    for epochs in ("5", "3"):  # a finished run (this one kept its checkpoint): nothing left, whatever is asked
        assert main(["train", "--resume", str(ref), "--epochs", epochs, "--data-dir", str(data)]) == 2
        assert f"--resume {ref}: this run already finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(ref.parent / "nowhere")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_hostile_checkpoint_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": "cifar-onecycle-checkpoint/1", "model": Payload(marker)}, run / "checkpoint.pt")
    with pytest.raises(UserError, match="not a loadable checkpoint, refused"):
        load_checkpoint(run / "checkpoint.pt")
    (run / "checkpoint.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    assert main(["train", "--resume", str(run)]) == 2
    assert not marker.exists()


def test_checkpoint_of_another_model_is_refused(tmp_path):
    state = {"recipe": RECIPE.to_dict(), "model": {"fc.weight": torch.zeros(3, 3)}}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(UserError, match="do not fit the seed's ResNet"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.fixture(scope="module")
def stopped_mid_epoch(reference, tmp_path_factory):
    """A run stopped in its second epoch: its checkpoint holds the epoch's order."""
    data, _ = reference
    run = tmp_path_factory.mktemp("stopped") / "run"
    code, err = run_with_signals(data, run, "SIGTERM@6")
    assert code == 130, err
    checkpoint, _ = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["order"] is not None and checkpoint["draws"] is not None and 0 < checkpoint["batch"] < 4
    return data, run, checkpoint


@pytest.mark.slow  # one stopped run and 11 refused resumes: about 20 s here
@pytest.mark.parametrize("key, damage", [
    ("epoch", lambda v: "2"),
    ("epoch", lambda v: 99),                               # beyond the recipe's 3 epochs
    ("batch", lambda v: 10**9),                            # beyond the epoch's 4 steps
    ("order", lambda v: v + 1),                            # an index past the last image
    ("order", lambda v: v.float()),
    ("draws", lambda v: v + 9),                            # a crop offset past the padding: the gather would fail
    ("draws", lambda v: v[:-1]),                           # one position short of the order
    ("loss_sum", lambda v: None),
    ("history", lambda v: [{"epoch": 1, "no_such_column": 0.5}]),
    ("optimizer", lambda v: {"state": {}, "param_groups": []}),
    ("rng", lambda v: {**v, "torch": torch.zeros(3, dtype=torch.uint8)}),
])
def test_a_damaged_checkpoint_is_one_line_and_changes_nothing(stopped_mid_epoch, tmp_path, capsys, key, damage):
    data, stopped, checkpoint = stopped_mid_epoch
    run = tmp_path / "run"
    run.mkdir()
    for name in ("recipe.toml", "metrics.csv"):
        (run / name).write_bytes((stopped / name).read_bytes())
    save_checkpoint(run / "checkpoint.pt", {**checkpoint, key: damage(checkpoint[key])})
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--data-dir", str(data), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--resume {run}: checkpoint.pt is damaged or does not fit this run (" in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.slow
def test_run_killed_after_its_last_checkpoint_is_finished_by_resume(reference, tmp_path):
    data, ref = reference
    run = tmp_path / "run"
    import shutil

    shutil.copytree(ref, run)
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_same_run(run, ref)
    # the last epoch's pass is not in the checkpoint: the resumed run's end scored TTA itself
    summary, ref_summary = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert {k: summary[k] for k in ("final_test_acc", "final_test_acc_tta", "per_class_accuracy")} == {
        k: ref_summary[k] for k in ("final_test_acc", "final_test_acc_tta", "per_class_accuracy")}
