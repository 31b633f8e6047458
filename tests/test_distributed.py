"""torchrun with 2 CPU processes (gloo) against one process on the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

from cifar_onecycle.augment import epoch_batches
from cifar_onecycle.distributed import test_shard as shard_of_test_set

ARGS = ["--epochs", "3", "--peak-epoch", "1", "--batch-size", "20", "--lr-max", "0.05", "--logit-scale", "0.125",
        "--bn-momentum", "0.5", "--device", "cpu", "--precision", "fp32", "--eval-batch-size", "16"]


def test_rank_shares_cover_every_training_index_once():
    n, batch, world = 103, 20, 4
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    labels = torch.arange(n)  # the labels name the images
    seen = []
    for rank in range(world):
        for _, y in epoch_batches(images, labels, batch, crop=False, padding=0, flip=False, cutout_size=0,
                                  order=order, draws=torch.zeros(n, 5, dtype=torch.int64), rank=rank, world=world):
            assert len(y) == batch // world
            seen += y.tolist()
    assert sorted(seen) == sorted(order[:(n // batch) * batch].tolist())  # the full batches, once each


def test_test_set_shards_cover_it_once():
    for n, world in [(30, 2), (31, 2), (5000, 3), (7, 7)]:
        idx = [i for r in range(world) for i in range(n)[shard_of_test_set(n, r, world)]]
        assert idx == list(range(n))


@pytest.fixture(autouse=True)
def temporary_folder_in_tmp_path(tmp_path, monkeypatch):
    """torchrun leaves a torchelastic_* folder in the temporary folder at each launch: this test's own."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))


def run(cmd, **env):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    from conftest import write_cifar

    data = write_cifar(tmp_path / "data").parent
    # With a weight average and TTA, so that their evaluation under DDP (rank 0's statistics) is covered.
    # contiguous NCHW: the CPU's channels_last convolution gradients differ from a split batch's by
    # 1e-3 (relative), NCHW's by 2e-6, and the exact check below needs the latter
    # Two epochs (the last --epochs wins over ARGS's): the second already trains on what the first synchronised.
    common = ["--data-dir", str(data), "--no-download", *ARGS, "--epochs", "2", "--ema-decay", "0.5", "--ema-every",
              "1", "--tta", "--no-channels-last"]
    one = run([sys.executable, "-m", "cifar_onecycle", "train", "--out", str(tmp_path / "one"), "--quiet", *common])
    assert one.returncode == 0, one.stderr
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cifar_onecycle", "train", "--out", str(tmp_path / "two"), *common])
    assert two.returncode == 0, two.stderr[-3000:]
    # rank 0 alone printed and wrote: one line per epoch, one final line, each file once
    assert two.stdout.count("final test accuracy") == 1
    assert sum(line.startswith("epoch ") for line in two.stdout.splitlines()) == 2
    rows = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "1", "2"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    import json

    a = json.loads((tmp_path / "one" / "summary.json").read_text())
    b = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert a["steps_per_epoch"] == b["steps_per_epoch"] == 5 and b["test_images"] == 30
    # Same global batch, augmented images, schedule and initial weights; per-rank BatchNorm
    # statistics and gradient sums in another order. Tolerance: 0.2 of accuracy on these 30
    # colour-coded test images.
    assert abs(a["final_test_acc"] - b["final_test_acc"]) <= 0.2, (a["final_test_acc"], b["final_test_acc"])
    assert b["final_test_acc"] >= 0.5
    assert abs(b["final_test_acc_without_ema"] - a["final_test_acc_without_ema"]) <= 0.2
    assert "test_acc_tta" in rows[0] and b["final_test_acc_tta"] is not None
    # The exact check: one process whose BatchNorm takes its statistics over the same halves of each
    # batch (ghost batches of 10) trains as the two processes do, step for step: the same training
    # loss every epoch, but for the order of the gradient sums. (Their evaluations differ: the two
    # processes evaluate with rank 0's running statistics, of its halves alone.)
    ghost = run([sys.executable, "-m", "cifar_onecycle", "train", "--out", str(tmp_path / "ghost"), "--quiet",
                 "--no-report", "--bn-ghost-batch", "10", *common])
    assert ghost.returncode == 0, ghost.stderr
    import csv

    def training(name):
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return [float(r["train_loss"]) for r in csv.DictReader(f)]

    # Measured on torch 2.13, 2 epochs on an AVX2-only CPU: the first epoch's loss the same to 5
    # digits, the second 0.06% apart (the gradient sums' order, amplified by five steps on 10-image
    # BatchNorm); without ghost batches 1.4% and 25%. Over 3 epochs: the third 0.09% apart
    # natively, 0.13% with oneDNN held to AVX2; on torch 2.4, the oldest supported, 0.03%, 0.6% and
    # 0.2% (the cause not traced). The training accuracy is no such check: a count over 100 images
    # whose near ties flip with the last digits (3 images apart in the third epoch with AVX2).
    for loss_two, loss_ghost in zip(training("two"), training("ghost"), strict=True):
        assert loss_two == pytest.approx(loss_ghost, rel=1e-2)
    assert any(loss_one != pytest.approx(loss_two, rel=1e-2)
               for loss_one, loss_two in zip(training("one"), training("two"), strict=True))


@pytest.mark.slow
def test_a_batch_that_does_not_split_is_refused(tmp_path):
    from conftest import write_cifar

    data = write_cifar(tmp_path / "data").parent
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             "-m", "cifar_onecycle", "train", "--data-dir", str(data), "--out", str(tmp_path / "x"),
             *ARGS[:4], "--batch-size", "21", "--device", "cpu"])
    assert r.returncode != 0
    assert "must divide by the 2 processes" in r.stderr
    assert not (tmp_path / "x").exists()


def hooked_main(step: int, rank: int, action: str, more_hooks: str = "") -> str:
    """A child script: the CLI's main, doing ``action`` on ``rank`` when step ``step`` asks for its LR;
    ``more_hooks``, lines run before main that may patch ``t`` (cifar_onecycle.training) further."""
    return f"""
import os, signal, sys
import cifar_onecycle.training as t
from cifar_onecycle.schedule import OneCycle
real = OneCycle.lr
def lr(self, step):
    if step == {step} and os.environ["RANK"] == "{rank}":
        {action}
    return real(self, step)
OneCycle.lr = lr
{more_hooks}
from cifar_onecycle.cli import main
sys.exit(main(sys.argv[1:]))
"""


CRASH_ON_RANK_1 = hooked_main(3, 1, 'raise RuntimeError("rank 1 fails on purpose")')


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_the_job_without_a_hang(tmp_path):
    from conftest import write_cifar

    data = write_cifar(tmp_path / "data").parent
    script = tmp_path / "crash.py"
    script.write_text(CRASH_ON_RANK_1)
    r = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
             "train", "--data-dir", str(data), "--out", str(tmp_path / "x"), "--quiet", *ARGS])
    assert r.returncode != 0
    assert "rank 1 fails on purpose" in r.stderr


# Rank 0 takes a second more over each checkpoint: rank 1, which saves nothing, must wait for it
# before it stops, since torchrun ends the other ranks once one exits.
SIGINT_ON_RANK_0 = hooked_main(6, 0, "os.kill(os.getpid(), signal.SIGINT)", more_hooks="""
import time
real_save = t.save_checkpoint
def save_checkpoint(*args):
    if os.environ["RANK"] == "0":
        time.sleep(1)
    real_save(*args)
t.save_checkpoint = save_checkpoint""")


@pytest.mark.slow
def test_resume_and_lr_find_under_torchrun(tmp_path):
    import csv

    from safetensors.torch import load_file

    from cifar_onecycle.checkpoint import load_checkpoint
    from conftest import write_cifar

    data = write_cifar(tmp_path / "data").parent
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    # No reports: rank 0's is test_two_processes_train_like_one's (4 s a report on an AVX2-only CPU)
    common = ["--data-dir", str(data), "--no-download", "--quiet", *ARGS]
    full = run([*torchrun, "-m", "cifar_onecycle", "train", "--out", str(tmp_path / "full"), "--no-report", *common])
    assert full.returncode == 0, full.stderr[-2000:]
    script = tmp_path / "sigint.py"
    script.write_text(SIGINT_ON_RANK_0)
    cut = run([*torchrun, str(script), "train", "--out", str(tmp_path / "cut"), "--no-report", *common])
    assert cut.returncode != 0 and "stopped by SIGINT" in cut.stderr and "--resume" in cut.stderr
    assert "(rank 1): error: stopped by a signal to another rank" in cut.stderr  # both stop, cleanly
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")[0]["epoch"] == 2  # as both said
    resumed = run([*torchrun, "-m", "cifar_onecycle", "train", "--resume", str(tmp_path / "cut"), "--quiet",
                   "--no-report"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    keep = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")
    rows = [[{k: r[k] for k in keep} for r in csv.DictReader((tmp_path / d / "metrics.csv").open())]
            for d in ("full", "cut")]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    lrf = run([*torchrun, "-m", "cifar_onecycle", "lr-find", "--mode", "exp", "--num-iter", "12",
               "--out", str(tmp_path / "lrf"), *common[:3], "--batch-size", "20", "--device", "cpu"])
    assert lrf.returncode == 0, lrf.stderr[-2000:]
    assert lrf.stdout.count("exp: LRMAX") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "lrf").iterdir()) == ["lr_find.json", "lr_find_exp.png"]


def noisy_folder(root):
    """A folder data set of 10 classes, each a colour plus noise (every image its own): 10 training
    and 3 test images a class."""
    from PIL import Image

    from conftest import synthetic_batch

    for split, n, seed in (("train", 100, 1), ("test", 30, 2)):
        batch = synthetic_batch(n, seed)
        for i, (label, pixels) in enumerate(zip(batch[b"labels"], batch[b"data"], strict=True)):
            path = root / split / f"c{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.reshape(3, 32, 32).transpose(1, 2, 0)).save(path)
    return root


@pytest.mark.slow
def test_two_processes_hold_out_the_same_images_on_a_folder_and_validate_each_once(tmp_path):
    import csv
    import json

    from cifar_onecycle.checkpoint import load_weights
    from cifar_onecycle.datasets import load_dataset
    from cifar_onecycle.evaluation import evaluate
    from cifar_onecycle.holdout import holdout_split

    root = noisy_folder(tmp_path / "photos")
    common = ["--dataset", "folder", "--data-dir", str(root), "--holdout", "20", *ARGS, "--no-channels-last",
              "--quiet", "--no-report"]
    # The two ranks start with no cache: both decode the folder, and both write the cache (atomically).
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "cifar_onecycle", "train", "--out", str(tmp_path / "two"), *common])
    assert two.returncode == 0, two.stderr[-3000:]
    # One process whose BatchNorm sees the same halves of each batch trains as the two do (see
    # test_two_processes_train_like_one): only if every rank trains on the same 80 images.
    ghost = run([sys.executable, "-m", "cifar_onecycle", "train", "--out", str(tmp_path / "ghost"),
                 "--bn-ghost-batch", "10", *common])
    assert ghost.returncode == 0, ghost.stderr

    def rows(name):
        with open(tmp_path / name / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))

    # Measured: the first epoch's loss the same to 6 digits, the third 2e-4 apart (the order of the
    # gradient sums); with a holdout drawn on each rank by its own generator, 0.7% apart at once.
    first_two, first_ghost = float(rows("two")[0]["train_loss"]), float(rows("ghost")[0]["train_loss"])
    assert first_two == pytest.approx(first_ghost, rel=1e-4)
    for a, b in zip(rows("two"), rows("ghost"), strict=True):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=5e-3)
        assert abs(float(a["train_acc"]) - float(b["train_acc"])) <= 0.02
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["train_images"] == 80 and summary["val_images"] == 20 and summary["test_images"] == 30
    # The ranks' validation shards sum to the held-out images, each once: the last epoch's numbers
    # are those of the saved model on those 20 images, evaluated here in one process.
    model, recipe = load_weights(tmp_path / "two")
    data = load_dataset(recipe, root, download=False)
    _, held = holdout_split(data.train_labels, 20, 10)
    loss, acc = evaluate(model, data.train_images[held], data.train_labels[held], batch_size=16,
                         channels_last=False, normalization=recipe.normalization)
    last = rows("two")[-1]
    assert float(last["val_loss"]) == pytest.approx(loss, rel=1e-5) and float(last["val_acc"]) == acc
    assert summary["final_val_acc"] == acc
