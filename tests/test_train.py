import csv
import json
import time

import pytest
import torch
from safetensors.torch import load_file

from cifar_onecycle import DivergenceError, Recipe, load_cifar10, train
from cifar_onecycle.checkpoint import load_weights
from cifar_onecycle.cli import main
from cifar_onecycle.device import resolve_precision
from conftest import recipe_flags

# Four steps of 10 images an epoch (a subset of 40 of the 100 synthetic ones): the step's cost is its
# images' (on one core of an AVX2-only CPU 0.41 s at batch 8, 0.59 at 12, 1.29 at 25). Few steps:
# BN statistics must catch up fast.
TINY = dict(epochs=2, peak_epoch=1, batch_size=10, train_subset=40, eval_batch_size=16, device="cpu",
            precision="fp32", lr_max=0.02, logit_scale=0.125, bn_momentum=0.5)
# All 100 synthetic images, 4 steps of 25: for the tests about the whole training set
WHOLE = {**TINY, "batch_size": 25, "train_subset": 0}


@pytest.mark.slow
def test_tiny_run_writes_the_run_folder(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    result = train(Recipe(**TINY), data_dir=cifar_dir, download=False, out=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [  # the checkpoint's use ended with the run
        "augment.png", "confusion.png", "curves.png", "gradcam.png", "lr_schedule.png",
        "metrics.csv", "misclassified.png", "model.safetensors", "recipe.toml", "report.md", "summary.json"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_seconds",
                             "images_per_second"]
    # 100 images / batch 25 = 4 steps an epoch; the peak (epoch 1's last step) and the end are knots.
    assert [float(r["lr"]) for r in rows] == [0.02, 1e-4]
    s = json.loads((out / "summary.json").read_text())
    assert s["parameters"] == 6_573_130 and s["epochs"] == 2 and s["steps_per_epoch"] == 4
    assert s["final_test_acc"] == result.history[-1].test_acc == pytest.approx(float(rows[-1]["test_acc"]), abs=1e-6)
    assert s["best_test_acc"] == max(h.test_acc for h in result.history)
    assert s["precision"] == "fp32" and s["device"].startswith("cpu") and s["torch"] == torch.__version__
    model, recipe = load_weights(out)
    assert recipe == result.recipe
    for k, v in result.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.contiguous())
    assert len(load_file(out / "model.safetensors")) == len(result.model.state_dict())
    assert main(["train", "--resume", str(out)]) == 2  # finished, as its summary says: not trained again
    assert f"--resume {out}: this run already finished" in capsys.readouterr().err


@pytest.mark.slow
def test_same_seed_same_run_on_cpu(cifar_dir):
    data = load_cifar10(cifar_dir, download=False)
    a = train(Recipe(**TINY), data=data, progress=False)
    b = train(Recipe(**TINY), data=data, progress=False)
    c = train(Recipe(**TINY, seed=1), data=data, progress=False)
    def strip(r):
        return [(h.train_loss, h.train_acc, h.test_loss, h.test_acc) for h in r.history]
    assert strip(a) == strip(b) and strip(a) != strip(c)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


@pytest.mark.slow
def test_learns_the_synthetic_classes(cifar_dir):
    r = train(Recipe(**{**TINY, "lr_max": 0.05}), data_dir=cifar_dir, download=False, progress=False)
    assert r.history[-1].test_acc >= 0.6  # chance is 0.1; measured 0.87


@pytest.mark.slow
def test_divergence_stops_the_run(cifar_dir):
    with pytest.raises(DivergenceError, match=r"diverged: loss is (nan|inf) in epoch 1.*LR") as e:
        train(Recipe(**{**TINY, "lr_max": 1e12, "logit_scale": 1.0}), data_dir=cifar_dir, download=False,
              progress=False)
    assert e.value.exit_code == 3


@pytest.mark.slow
def test_existing_run_is_refused_unless_overwrite(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(cifar_dir), "--no-download", "--out", str(out), "--quiet",
            "--epochs", "1", "--peak-epoch", "1", "--batch-size", "50", "--lr-max", "0.01", "--device", "cpu"]
    assert main(args) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main([*args, "--overwrite", "--seed", "3"]) == 0
    assert (out / "model.safetensors").read_bytes() != before


@pytest.mark.slow
def test_evaluate_cli(cifar_dir, tmp_path, capsys):
    result = train(Recipe(**TINY), data_dir=cifar_dir, download=False, out=tmp_path / "run", progress=False)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--data-dir", str(cifar_dir), "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["images"] == 30
    assert got["accuracy"] == pytest.approx(result.history[-1].test_acc)
    assert got["loss"] == pytest.approx(result.history[-1].test_loss, rel=1e-5)


def test_evaluate_refuses_foreign_files(tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert main(["evaluate", str(bad)]) == 2
    assert "not a safetensors weights file" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_uses_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, native_bf16, expected):
    import sys

    # Emulated bf16 is 13 times slower than fp32 on an AVX2-only CPU: auto must fall back to fp32 there.
    monkeypatch.setattr(sys.modules["cifar_onecycle.device"], "cpu_has_native_bf16", lambda: native_bf16)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice is kept
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_evaluate_refuses_weights_of_another_model(tmp_path, capsys):
    import json as _json

    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, path, metadata={"recipe": _json.dumps(Recipe().to_dict())})
    assert main(["evaluate", str(path)]) == 2
    assert "do not fit the seed's ResNet" in capsys.readouterr().err


def test_evaluate_with_flip_tta():
    from cifar_onecycle.augment import normalize
    from cifar_onecycle.evaluation import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    plain = evaluate(model, images, labels, batch_size=16, channels_last=False)
    tta = evaluate(model, images, labels, batch_size=16, channels_last=False, tta=True)
    mirrored = evaluate(model, images.flip(-1), labels, batch_size=16, channels_last=False)
    assert tta != plain
    # a linear model's mirrored-average logits are the logits of the average image
    avg = torch.nn.functional.cross_entropy(
        (model(normalize(images)) + model(normalize(images.flip(-1)))) / 2, labels).item()
    assert tta[0] == pytest.approx(avg, rel=1e-5)
    symmetric = torch.cat([images[..., :16], images[..., :16].flip(-1)], -1)  # its own mirror image
    assert evaluate(model, symmetric, labels, tta=True, channels_last=False) == pytest.approx(
        evaluate(model, symmetric, labels, channels_last=False))
    assert mirrored != plain  # the mirror really is another input for this model


def test_one_pass_scores_plain_and_tta_and_keeps_the_plain_probabilities():
    # A run's final evaluation gives the TTA accuracy, the plain one and the report's predictions
    # in one pass, its unshifted forward shared: each must be what its own pass would give.
    from cifar_onecycle.distributed import Dist
    from cifar_onecycle.evaluation import evaluate, evaluate_sharded, logits_of, tta_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    for translate in (0, 1):
        scores = evaluate_sharded(model, images, labels, batch_size=16, precision="fp32", channels_last=False,
                                  dist=Dist(), tta=True, tta_translate=translate, keep_probabilities=True)
        assert (scores.loss, scores.acc) == pytest.approx(evaluate(model, images, labels, batch_size=16,
                                                                   channels_last=False))
        alone = tta_logits(model, images, "fp32", False, translate)  # every forward pass its own
        expected = torch.nn.functional.cross_entropy(alone, labels).item(), int((alone.argmax(1) == labels).sum()) / 40
        # 4e-8 apart here in relative terms: batches of 16 against one of 40
        assert (scores.tta_loss, scores.tta_acc) == pytest.approx(expected, rel=1e-5)
        assert scores.tta_loss != pytest.approx(scores.loss)
        assert scores.probabilities is not None
        torch.testing.assert_close(scores.probabilities, torch.softmax(logits_of(model, images, "fp32", False), 1))
    assert evaluate_sharded(model, images, labels, batch_size=16, precision="fp32", channels_last=False,
                            dist=Dist()).probabilities is None

    class OneOutputBuffer(torch.nn.Module):
        # As a model compiled with CUDA graphs (reduce-overhead) does: every call's output in the same memory.
        def __init__(self, inner):
            super().__init__()
            self.inner, self.out = inner, torch.empty(0)

        def forward(self, x):
            self.out.resize_(len(x), 10).copy_(self.inner(x))
            return self.out

    reusing, own = (evaluate_sharded(m, images, labels, batch_size=16, precision="fp32", channels_last=False,
                                     dist=Dist(), tta=True, keep_probabilities=True)
                    for m in (OneOutputBuffer(model), model))
    assert (reusing.loss, reusing.acc, reusing.tta_loss, reusing.tta_acc) == (own.loss, own.acc, own.tta_loss,
                                                                              own.tta_acc)
    assert reusing.probabilities is not None and own.probabilities is not None
    assert torch.equal(reusing.probabilities, own.probabilities)


def test_an_evaluation_takes_the_devices_batch_unless_the_recipe_sets_one():
    # A CPU scores batches of 64 faster than batches of 1000 (they stay in the cache); a GPU wants
    # large ones. eval_batch_size 0, the default, leaves the choice to the device.
    from cifar_onecycle.device import CPU_EVAL_BATCH, GPU_EVAL_BATCH, eval_batch
    from cifar_onecycle.evaluation import evaluate
    from cifar_onecycle.report import predict_probabilities

    assert Recipe().eval_batch_size == 0 and Recipe(eval_batch_size=7).eval_batch_size == 7
    assert (CPU_EVAL_BATCH, GPU_EVAL_BATCH) == (64, 1000)
    assert eval_batch(0, torch.device("cpu")) == 64 and eval_batch(0, torch.device("cuda")) == 1000
    assert eval_batch(50, torch.device("cpu")) == 50 and eval_batch(50, torch.device("cuda")) == 50

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.sizes = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)), []

        def forward(self, x):
            self.sizes.append(len(x))
            return self.inner(x)

    torch.manual_seed(0)
    model = Counting()
    images, labels = torch.randint(0, 256, (130, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (130,))
    by_device = evaluate(model, images, labels, channels_last=False)
    assert model.sizes == [64, 64, 2]
    model.sizes.clear()
    assert evaluate(model, images, labels, batch_size=50, channels_last=False) == pytest.approx(by_device)
    assert model.sizes == [50, 50, 30]
    model.sizes.clear()
    predict_probabilities(model, images, channels_last=False)
    assert model.sizes == [64, 64, 2]


@pytest.mark.slow
def test_a_measuring_run_writes_no_checkpoint_and_no_report(cifar_dir, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(cifar_dir), "--no-download", "--out", str(out), "--quiet",
                 "--no-checkpoint", "--no-report", *recipe_flags(Recipe(**TINY))])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "model.safetensors", "recipe.toml",
                                                     "summary.json"]


def test_the_commit_given_by_the_environment_wins(monkeypatch):
    import subprocess

    from cifar_onecycle.results import git_commit
    from conftest import ROOT

    monkeypatch.setenv("CIFAR_ONECYCLE_COMMIT", "0123abc")
    assert git_commit() == "0123abc"  # a shipped copy's own .git may be stale
    monkeypatch.delenv("CIFAR_ONECYCLE_COMMIT")
    assert git_commit() != "0123abc"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout: nothing else to compare with")
    assert git_commit() == head.stdout.strip()  # without the variable, the checkout's own commit


@pytest.mark.slow
def test_the_loop_reads_the_device_every_10_steps_on_a_cpu_and_once_an_epoch_on_a_gpu(cifar_dir, monkeypatch):
    import cifar_onecycle.training as training
    from cifar_onecycle.device import sync_every

    assert sync_every(torch.device("cpu"), 97) == 10  # a diverged loss is caught within 10 steps
    assert sync_every(torch.device("cuda"), 97) == 97  # no host sync inside a GPU epoch
    # The loop itself: 25 steps an epoch (batch 4 of 100 images) read at steps 10, 20 and 25 on a
    # CPU, and once, at the end, under a GPU's policy.
    data = load_cifar10(cifar_dir, download=False)
    reads = []
    gather_sums = training.gather_sums
    monkeypatch.setattr(training, "gather_sums", lambda setup, state, *a: reads.append(state.batch) or gather_sums(
        setup, state, *a))
    train(Recipe(**{**WHOLE, "batch_size": 4, "epochs": 1, "peak_epoch": 0.5}), data=data, progress=False)
    assert reads == [10, 20, 25]
    reads.clear()
    monkeypatch.setattr(training, "sync_every", lambda device, steps: sync_every(torch.device("cuda"), steps))
    train(Recipe(**{**WHOLE, "batch_size": 4, "epochs": 1, "peak_epoch": 0.5}), data=data, progress=False)
    assert reads == [25]


@pytest.mark.slow
def test_a_cpu_augments_one_batch_at_a_time_and_a_gpu_many(cifar_dir, monkeypatch):
    import cifar_onecycle.augment as augment
    import cifar_onecycle.run_setup as run_setup
    from cifar_onecycle.device import GPU_AUGMENT_IMAGES, augment_at_once

    assert augment_at_once(torch.device("cpu"), 512) == 1  # no memory spent on batches not yet trained
    assert augment_at_once(torch.device("cuda"), 512) == GPU_AUGMENT_IMAGES // 512 > 1
    assert augment_at_once(torch.device("cuda"), 10**6) == 1  # a batch larger than the group: one at a time
    # The loop itself: 4 batches an epoch, augmented one at a time on a CPU, all four at once under
    # a GPU's policy (the same images: tests/test_augment.py).
    data = load_cifar10(cifar_dir, download=False)
    groups = []
    apply = augment.apply_augmentation
    monkeypatch.setattr(augment, "apply_augmentation", lambda images, *a, **k: groups.append(len(images)) or apply(
        images, *a, **k))
    train(Recipe(**TINY), data=data, progress=False)
    assert groups == [10] * 8  # 2 epochs of 4 batches of 10
    groups.clear()
    monkeypatch.setattr(run_setup, "augment_at_once", lambda device, size, images: augment_at_once(
        torch.device("cuda"), size, images))
    train(Recipe(**TINY), data=data, progress=False)
    assert groups == [40] * 2
    groups.clear()
    train(Recipe(**TINY), data=data, progress=False, augment_images=20)  # the run's own setting
    assert groups == [20] * 4


def test_sgd_is_fused_on_cuda_only_unless_asked():
    from cifar_onecycle.step import make_optimizer

    model = torch.nn.Linear(2, 2)
    assert not make_optimizer(model, Recipe(), torch.device("cpu")).defaults["fused"]
    assert make_optimizer(model, Recipe(), torch.device("cuda")).defaults["fused"]  # placement is not checked
    assert make_optimizer(model, Recipe(), torch.device("cpu"), fused=True).defaults["fused"]


def test_a_resumed_run_joins_torchrun_with_its_own_device(tmp_path, monkeypatch):
    """The backend (NCCL or gloo) is chosen from the device before anything else is read: on resume,
    the run's own recipe decides it, not "auto" (which is CUDA on a machine that has it)."""
    import cifar_onecycle.training as training
    from cifar_onecycle.run_folder import RunFolder

    folder = RunFolder.create(tmp_path / "run")
    folder.write_recipe(Recipe(**TINY))  # device = "cpu"
    asked = []

    class Joined(Exception):
        pass

    def init_distributed(device):
        asked.append(device)
        raise Joined

    monkeypatch.setattr(training, "init_distributed", init_distributed)
    with pytest.raises(Joined):
        train(resume=folder.path)
    with pytest.raises(Joined):
        train(Recipe(**TINY).replace(device="auto"))
    assert asked == ["cpu", "auto"]


@pytest.mark.slow
def test_the_runs_time_counts_its_final_evaluations(cifar_dir, monkeypatch):
    # On a CPU the final passes (TTA, the test set after a holdout) took 26 s of a 95 s `quick` run:
    # a time that leaves them out understates what the user waits for.
    from cifar_onecycle.run_setup import RunSetup
    evaluate, ended = RunSetup.evaluate, []

    def slow_tta(self, *args, **kwargs):
        if kwargs.get("tta"):
            time.sleep(1.5)
        result = evaluate(self, *args, **kwargs)
        ended.append(time.perf_counter())
        return result

    monkeypatch.setattr(RunSetup, "evaluate", slow_tta)
    called = time.perf_counter()
    # with a holdout, the test set's one evaluation comes at the run's end
    r = train(Recipe(**TINY, holdout=20), data_dir=cifar_dir, download=False, progress=False)
    assert r.summary["total_seconds"] >= ended[-1] - called - 0.05  # the run's clock starts as train() does


@pytest.mark.slow
def test_the_runs_end_takes_the_last_epochs_pass_and_evaluates_only_what_it_lacks(cifar_dir, tmp_path, monkeypatch):
    # The last epoch's evaluation is the delivered model's: it scores TTA and keeps the report's
    # predictions, so that the run's end makes no pass over that split again (on a CPU, the
    # `quick` recipe's end took a plain and a mirrored pass over the test set for them).
    from cifar_onecycle.evaluation import evaluate
    from cifar_onecycle.run_setup import RunSetup
    real, calls = RunSetup.evaluate, []

    def spy(self, *args, **kwargs):
        calls.append((kwargs.get("split") or self.epoch_split, bool(kwargs.get("tta")),
                      bool(kwargs.get("keep_probabilities"))))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RunSetup, "evaluate", spy)
    r = train(Recipe(**TINY), data_dir=cifar_dir, download=False, out=tmp_path / "run", progress=False)
    assert calls == [("test", False, False), ("test", True, True)]  # epoch 1, epoch 2; none after
    data = load_cifar10(cifar_dir, download=False)
    assert r.summary["final_test_acc_tta"] == pytest.approx(evaluate(
        r.model, data.test_images, data.test_labels, batch_size=16, channels_last=True, tta=True)[1])
    assert [h.test_acc_tta for h in r.history] == [None, None]  # metrics.csv's columns stay the recipe's
    calls.clear()
    r = train(Recipe(**TINY, holdout=20), data_dir=cifar_dir, download=False, out=tmp_path / "held",
              progress=False)
    assert calls == [("val", False, False), ("val", True, False), ("test", True, True)]
    assert r.summary["final_val_acc_tta"] is not None and r.summary["final_test_acc_tta"] is not None


@pytest.mark.slow
def test_each_step_trains_with_the_cycling_momentum(cifar_dir):
    # Read as the optimizer steps (a pre-hook), so a momentum set after the update would be seen late.
    recipe = Recipe(**{**TINY, "epochs": 3}, momentum=0.95, momentum_at_peak=0.85)
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([g["momentum"] for g in optimizer.param_groups]))
    try:
        train(recipe, data_dir=cifar_dir, download=False, progress=False)
    finally:
        hook.remove()
    cycle = recipe.one_cycle(100 // 25)
    assert seen == [[pytest.approx(cycle.momentum(step))] for step in range(3 * 4)]
    assert seen[0] == seen[-1] == [0.95] and min(seen) == [pytest.approx(0.85)]
