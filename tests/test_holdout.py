"""The validation split (holdout): disjoint from training, stratified, the same for every seed, never
in a training batch; evaluated each epoch in place of the test set, which is evaluated once at the end."""
import csv
import json

import pytest
import torch

from cifar_onecycle import Cifar10, Recipe, train
from cifar_onecycle.augment import normalize
from cifar_onecycle.cli import main
from cifar_onecycle.holdout import holdout_split
from cifar_onecycle.run_setup import RunSetup, setup_run
from conftest import recipe_flags
from test_train import TINY, WHOLE


def test_the_split_is_disjoint_stratified_and_fixed():
    shuffle = torch.randperm(100, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)[shuffle]
    kept, held = holdout_split(labels, 10, classes=3)
    assert len(held) == 10 and len(kept) == 90
    assert set(kept.tolist()).isdisjoint(held.tolist()) and set(kept.tolist()) | set(held.tolist()) == set(range(100))
    assert torch.bincount(labels[held], minlength=3).tolist() == [6, 3, 1]  # each class its share
    assert torch.equal(held, held.sort().values) and torch.equal(kept, kept.sort().values)
    again_kept, again_held = holdout_split(labels, 10, classes=3)
    assert torch.equal(held, again_held) and torch.equal(kept, again_kept)
    # Largest remainder: 7 of 60/30/10 is 4.2, 2.1, 0.7 -> 4, 2, 1 (class 2 has the largest remainder).
    assert torch.bincount(labels[holdout_split(labels, 7, classes=3)[1]], minlength=3).tolist() == [4, 2, 1]


def test_with_classes_of_equal_size_a_smaller_holdout_is_within_a_larger():
    # what a sweep that varies holdout compares: each point's validation images contain the smaller ones'
    labels = torch.arange(1000) % 10
    sizes = [10, 13, 100, 101, 250, 900]
    held = [set(holdout_split(labels, n, classes=10)[1].tolist()) for n in sizes]
    assert [len(h) for h in held] == sizes
    assert all(small < large for small, large in zip(held, held[1:], strict=False))


@pytest.mark.parametrize("n, message", [
    (2, "at least one image a class (3)"),
    (100, "fewer than the 100 training images"),
])
def test_the_split_refuses_impossible_sizes(n, message):
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        holdout_split(labels, n, classes=3)


def test_a_class_too_rare_for_its_share_is_refused():
    labels = torch.tensor([0] * 98 + [1] * 1 + [2] * 1)
    with pytest.raises(Exception, match="leaves class 1 no validation image"):
        holdout_split(labels, 5, classes=3)


def unique_images(n_train: int = 100, n_test: int = 30) -> Cifar10:
    """Each image one flat colour that no other image has, so that its centre pixel names it."""
    def flat(n: int, offset: int) -> torch.Tensor:
        ids = torch.arange(offset, offset + n)
        rgb = torch.stack([ids % 256, ids // 256 * 16, 255 - ids % 256], 1).to(torch.uint8)
        return rgb[:, :, None, None].expand(n, 3, 32, 32).contiguous()

    labels = torch.arange(n_train) % 10
    return Cifar10(flat(n_train, 0), labels, flat(n_test, 1000), torch.arange(n_test) % 10)


def test_no_held_out_image_reaches_a_training_batch(monkeypatch):
    data = unique_images()
    recipe = Recipe(**WHOLE, holdout=20, crop=False, flip=False, cutout=False)
    seen: list[torch.Tensor] = []
    step = RunSetup.step

    def recording(self, inputs, targets, *schedule):
        seen.append(inputs[:, :, 16, 16].clone())
        return step(self, inputs, targets, *schedule)

    monkeypatch.setattr(RunSetup, "step", recording)
    result = train(recipe, data=data, progress=False)
    trained = {tuple(p.tolist()) for p in torch.cat(seen).round(decimals=4)}
    _, held = holdout_split(data.train_labels, 20, 10)
    def centres(images):
        return {tuple(p.tolist()) for p in normalize(images)[:, :, 16, 16].round(decimals=4)}

    held_pixels = centres(data.train_images[held])
    kept_pixels = centres(data.train_images) - held_pixels
    assert len(held_pixels) == 20 and trained and trained <= kept_pixels
    assert trained.isdisjoint(held_pixels)
    assert len(trained) >= 75  # 3 batches of 25 from the 80 kept images, each epoch
    assert result.summary["val_images"] == 20 and result.summary["train_images"] == 80


def test_every_seed_holds_out_the_same_images_and_a_subset_trains_on_the_rest():
    data = unique_images()
    a = setup_run(Recipe(**TINY, holdout=20, crop=False), data)
    b = setup_run(Recipe(**TINY, holdout=20, crop=False, seed=7), data)
    c = setup_run(Recipe(**{**TINY, "train_subset": 50}, holdout=20, crop=False), data)
    assert torch.equal(a.val_images, b.val_images) and torch.equal(a.val_images, c.val_images)
    kept, _ = holdout_split(data.train_labels, 20, 10)
    assert torch.equal(c.train_images, data.train_images[kept[:50]])  # the first 50 of what is left
    assert a.epoch_split == "val" and setup_run(Recipe(**TINY, crop=False), data).epoch_split == "test"


@pytest.mark.parametrize("flags, message", [
    (["--holdout", "5"], "--holdout 5: give at least one image a class (10)"),
    (["--holdout", "100"], "fewer than the 100 training images"),
    (["--holdout", "90"], "--batch-size 25 is larger than the 10 training images left by --holdout 90"),
    (["--holdout", "60", "--train-subset", "50"], "--train-subset 50: only 40 training images once --holdout 60"),
])
def test_a_holdout_the_data_cannot_give_is_one_line(cifar_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    code = main(["train", "--data-dir", str(cifar_dir), "--no-download", *recipe_flags(Recipe(**WHOLE)), *flags,
                 "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_a_run_with_a_holdout_chooses_on_validation_and_tests_once(cifar_dir, tmp_path):
    out = tmp_path / "run"
    result = train(Recipe(**TINY, holdout=20), data_dir=cifar_dir, download=False, out=out, progress=False)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "train_seconds", "images_per_second",
                             "val_loss", "val_acc"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_acc"] == result.history[-1].val_acc == float(rows[-1]["val_acc"])
    assert summary["best_val_acc"] == max(h.val_acc for h in result.history) and "best_test_acc" not in summary
    assert all(h.test_acc is None for h in result.history)
    # The test set's one evaluation is that of the delivered model, at the end.
    from cifar_onecycle.evaluation import evaluate
    from cifar_onecycle.run_setup import setup_run as setup
    run = setup(result.recipe, Cifar10(*_tensors(cifar_dir)))
    loss, acc = evaluate(result.model, run.test_images, run.test_labels, batch_size=16)
    assert summary["final_test_acc"] == pytest.approx(acc) and summary["final_test_loss"] == pytest.approx(loss)
    assert summary["final_val_acc_tta"] is not None and summary["final_test_acc_tta"] is not None
    assert "validation" in (out / "report.md").read_text() and "| val loss | val acc |" in (
        out / "report.md").read_text()


def _tensors(cifar_dir):
    from cifar_onecycle import load_cifar10

    d = load_cifar10(cifar_dir, download=False)
    return d.train_images, d.train_labels, d.test_images, d.test_labels


@pytest.mark.slow
def test_evaluate_on_the_validation_split_gives_the_runs_own_numbers(cifar_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(Recipe(**TINY, holdout=20), data_dir=cifar_dir, download=False, out=out, progress=False)
    summary = json.loads((out / "summary.json").read_text())

    def evaluated(*flags):
        assert main(["evaluate", str(out), "--json", *flags]) == 0  # the data folder the run recorded
        return json.loads(capsys.readouterr().out)

    val, val_tta, test = evaluated("--split", "val"), evaluated("--split", "val", "--tta"), evaluated()
    assert (val["split"], val["images"], test["split"], test["images"]) == ("val", 20, "test", 30)
    assert val["accuracy"] == pytest.approx(summary["final_val_acc"], abs=1e-9)
    assert val["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)  # the same 20 images, not others
    assert val_tta["accuracy"] == pytest.approx(summary["final_val_acc_tta"], abs=1e-9)
    assert (val_tta["accuracy_without_tta"], val_tta["loss_without_tta"]) == (val["accuracy"], val["loss"])
    assert test["loss"] == pytest.approx(summary["final_test_loss"], rel=1e-6)
    shifted = evaluated("--split", "val", "--tta", "--tta-translate", "2")
    assert shifted["tta_translate"] == 2 and shifted["loss"] != val_tta["loss"]  # six passes, not two
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    assert capsys.readouterr().out.startswith("validation accuracy ")
    assert main(["evaluate", str(out), "--split", "val", "--tta"]) == 0
    assert f"flip TTA; without it {val['accuracy']:.2%}, loss {val['loss']:.4f})" in capsys.readouterr().out
    # --per-class: the run's own per-class accuracy on the test set; on the validation split a table
    # whose classes' images add up to the split and whose accuracies, so weighed, to its accuracy.
    assert evaluated("--per-class")["per_class_accuracy"] == summary["per_class_accuracy"]
    assert main(["evaluate", str(out), "--split", "val", "--tta", "--per-class"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "by class, without TTA:" and lines[2].split()[:3] == ["class", "validation", "images"]
    rows = [line.split() for line in lines[3:]]
    assert [row[0] for row in rows] == list(Recipe(**TINY).class_names)
    assert sum(int(row[1]) for row in rows) == 20
    assert sum(int(row[1]) * float(row[2]) for row in rows) / 20 == pytest.approx(100 * val["accuracy"])


@pytest.mark.parametrize("holdout, flags, message", [
    (0, ["--split", "val"], "its run held out no training images (holdout 0); --split val needs a run trained "
                            "with --holdout N"),
    (20, ["--split", "val", "--dataset", "cifar10"], "--split val scores the images the run held out of its own "
                                                      "training set; leave out --dataset"),
    (20, ["--tta-translate", "1"], "--tta-translate goes with --tta"),
])
def test_an_evaluation_the_run_cannot_give_is_one_line(cifar_dir, tmp_path, capsys, holdout, flags, message):
    from cifar_onecycle.checkpoint import save_weights
    from cifar_onecycle.model import ResNet9

    save_weights(ResNet9(), tmp_path / "model.safetensors", Recipe(**TINY, holdout=holdout))
    code = main(["evaluate", str(tmp_path / "model.safetensors"), "--data-dir", str(cifar_dir), "--no-download",
                 *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
