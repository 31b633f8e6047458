import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from cifar_onecycle import Recipe, train
from cifar_onecycle.cli import main
from cifar_onecycle.report import confusion_matrix, grad_cam

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PICTURES = ["augment.png", "confusion.png", "curves.png", "gradcam.png", "lr_schedule.png", "misclassified.png"]
TINY = Recipe(epochs=2, peak_epoch=1, batch_size=25, eval_batch_size=16, device="cpu", precision="fp32",
              lr_max=0.05, logit_scale=0.125, bn_momentum=0.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import write_cifar

    root = tmp_path_factory.mktemp("report")
    data = write_cifar(root / "data").parent
    result = train(TINY, data_dir=data, download=False, out=root / "run", progress=False)
    return result, data


@pytest.mark.slow
def test_every_picture_is_a_valid_png(run):
    result, _ = run
    for name in PICTURES:
        path = result.run_dir / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        with Image.open(path) as img:
            img.verify()
            assert img.size[0] > 300 and img.size[1] > 200


def test_report_md_and_per_class_accuracy(run):
    result, _ = run
    md = (result.run_dir / "report.md").read_text()
    assert "Total params: 6,573,130" in md
    assert "1. RandomCrop 32 (after reflect-padding 4)\n2. FlipLR\n3. CutOut 8x8" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split()[1] for r in rows] == ["1", "2"] and sum("(best)" in r for r in rows) == 1
    for name in PICTURES:
        assert f"({name})" in md
    per_class = json.loads((result.run_dir / "summary.json").read_text())["per_class_accuracy"]
    assert len(per_class) == 10 and all(0 <= v <= 1 for v in per_class.values())
    # the synthetic test set has 3 images per class: per-class accuracies average to the accuracy
    assert sum(per_class.values()) / 10 == pytest.approx(result.final_test_acc)
    # report.md's table of classes says the same, class by class
    start = md.index("### Accuracy by class")
    table = [line.split(" | ") for line in md[start:].splitlines() if line.startswith("| ")][2:]
    assert [(name.lstrip("| "), images, float(acc)) for name, images, acc, _ in table] == [
        (name, "3", pytest.approx(100 * acc, abs=0.005)) for name, acc in per_class.items()]


def test_the_table_of_classes_names_each_class_and_what_it_is_taken_for():
    from cifar_onecycle.report import class_rows

    # rows: true class; a: 6 of 8 right, 2 taken for b; b: 9 of 10, 1 taken for a; c: none in the test set
    cm = torch.tensor([[6, 2, 0], [1, 9, 0], [0, 0, 0]])
    assert class_rows(cm, ["a", "b", "c"]) == [["class", "test images", "accuracy %", "most often taken for"],
                                               ["a", "8", "75.00", "b (25.0%)"], ["b", "10", "90.00", "a (10.0%)"],
                                               ["c", "0", "-", "-"]]
    assert class_rows(torch.tensor([[4, 0], [0, 5]]), ["a", "b"])[1:] == [["a", "4", "100.00", "-"],
                                                                          ["b", "5", "100.00", "-"]]


def test_the_reports_model_table_has_the_runs_outputs():
    from cifar_onecycle.report import model_table

    assert "Total params: 6,573,130" in model_table(Recipe())
    table = model_table(Recipe(dataset="cifar100", classes=tuple(f"c{i}" for i in range(100))))
    # 512 x 100 weights and 100 biases in place of 512 x 10 and 10
    assert "Linear-21                  [-1, 100]          51,300" in table and "Total params: 6,619,300" in table
    # and the receptive field, its last row the final max-pool's
    assert table.endswith("        MaxPool2d-20        4        4        0        1       32               88\n"
                          "The receptive field reaches the input's 32 pixels at MaxPool2d-14; the last layer's is 88.")


@pytest.mark.slow
def test_report_command_rewrites_the_pictures(run, capsys):
    result, data = run
    (result.run_dir / "curves.png").unlink()
    assert main(["report", str(result.run_dir), "--data-dir", str(data), "--device", "cpu"]) == 0
    assert (result.run_dir / "curves.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_an_overwrite_leaves_nothing_of_the_earlier_runs_report_or_range_test(run, tmp_path, capsys):
    import shutil

    from cifar_onecycle.run_folder import REPORT_FILES, RUN_FILES
    from conftest import recipe_flags

    result, data = run
    folder = tmp_path / "run"
    shutil.copytree(result.run_dir, folder)
    assert main(["lr-find", "--mode", "both", "--num-iter", "10", "--out", str(folder), "--data-dir", str(data),
                 *recipe_flags(TINY)]) == 0
    written = {p.name for p in folder.iterdir()}
    assert {"lr_find_exp.png", "lr_find_linear.png", "lr_find.json", "report.md"} <= written
    assert written <= {*RUN_FILES, *REPORT_FILES}, "a file of a run's folder that an overwrite would leave"
    (folder / "tensorboard").mkdir()  # as --tensorboard leaves it (its extra is not installed here)
    (folder / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"the earlier run's scalars")
    (folder / "tensorboard" / "notes.txt").write_text("someone's")
    assert main(["train", "--out", str(folder), "--overwrite", "--no-report", "--data-dir", str(data), "--quiet",
                 "--keep-checkpoint", *recipe_flags(TINY)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt", "metrics.csv", "model.safetensors", "recipe.toml", "summary.json", "tensorboard"]
    assert [p.name for p in (folder / "tensorboard").iterdir()] == ["notes.txt"]


def test_confusion_matrix_counts():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    cm = confusion_matrix(labels, preds, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_grad_cam_on_a_tiny_model():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(3, 3, 16, 12)
    cam = grad_cam(model, conv, x)
    assert cam.shape == (3, 16, 12)
    assert cam.min() >= 0 and cam.max() <= 1
    assert all(m == 1.0 or m == 0.0 for m in cam.flatten(1).max(1).values.tolist())
    assert not x.requires_grad and all(p.grad is None for p in model.parameters())


def test_predict_good_huge_and_bad_files(run, tmp_path, capsys):
    result, _ = run
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(good)
    huge = tmp_path / "huge.jpg"
    Image.new("RGB", (6000, 4000), (30, 200, 30)).save(huge, quality=80)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    code = main(["predict", str(result.run_dir), str(good), str(text), str(huge), "--json", "--device", "cpu"])
    assert code == 2  # one file failed
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["path"] for d in lines] == [str(good), str(text), str(huge)]
    for d in (lines[0], lines[2]):
        assert len(d["top3"]) == 3 and d["class"] == d["top3"][0]["class"]
        assert sum(t["probability"] for t in d["top3"]) <= 1 + 1e-6
    # The good image's top 3 are the model's own: a flat 32x32 picture needs no resizing, so its
    # probabilities are the softmax of the saved model's logits for those pixels.
    from cifar_onecycle import CLASSES
    from cifar_onecycle.checkpoint import load_weights
    from cifar_onecycle.evaluation import logits_of

    model, recipe = load_weights(result.run_dir)
    pixels = torch.tensor([200, 30, 30], dtype=torch.uint8)[:, None, None].expand(3, 32, 32)[None]
    probabilities = torch.softmax(logits_of(model.eval(), pixels, "fp32", recipe.channels_last), 1)[0]
    values, classes = probabilities.topk(3)
    assert [t["class"] for t in lines[0]["top3"]] == [CLASSES[i] for i in classes.tolist()]
    assert [t["probability"] for t in lines[0]["top3"]] == pytest.approx(values.tolist(), abs=1e-5)
    assert "not an image" in lines[1]["error"]
    assert main(["predict", str(result.run_dir), str(good), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"{good}: ")


def test_predict_a_folder_predicts_its_images_in_order_in_batches(run, tmp_path, capsys):
    from cifar_onecycle.image_folder import image_files
    from cifar_onecycle.predict import predict_files

    result, _ = run
    photos = tmp_path / "photos"
    (photos / "b-sub").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    for i, path in enumerate([photos / "c.PNG", photos / "a.jpg", photos / "b-sub" / "x.webp",
                              photos / ".dot.png", photos / ".hidden" / "y.png"]):
        Image.new("RGB", (40, 30), (60 * i, 100, 50)).save(path, format=path.suffix[1:].upper().replace("JPG", "JPEG"))
    (photos / "notes.txt").write_text("not an image")
    expected = [photos / "a.jpg", photos / "b-sub" / "x.webp", photos / "c.PNG"]
    assert image_files(photos, 3) == expected and image_files(photos, 2) is None
    one = tmp_path / "one.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(one)
    assert main(["predict", str(result.run_dir), str(one), str(photos), "--json", "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["path"] for d in lines] == [str(one), *map(str, expected)]
    # in batches of 2 (one with a file that fails): the same classes, in the same order
    from cifar_onecycle.checkpoint import load_weights

    model, recipe = load_weights(result.run_dir)
    paths = [str(one), str(photos / "notes.txt"), *map(str, expected)]
    batched = list(predict_files(model, paths, recipe.class_names, recipe.normalization, batch_size=2))
    assert [p.top[0][0] if p.top else "error" for p in batched] == [
        lines[0]["class"], "error", *[d["class"] for d in lines[1:]]]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["predict", str(result.run_dir), str(tmp_path / "empty"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cifar-onecycle: error: {tmp_path / 'empty'}: no images (PNG, JPEG, WebP, BMP or GIF) in it", err


def test_predict_draws_where_the_model_looked_for_the_class_it_predicts(run, tmp_path, capsys):
    from cifar_onecycle.augment import normalize
    from cifar_onecycle.checkpoint import load_weights
    from cifar_onecycle.predict import GRADCAM_IMAGES, gradcam_figure, predict_files

    result, _ = run
    (tmp_path / "cat").mkdir()
    paths = []
    for i in range(GRADCAM_IMAGES + 1):
        paths.append(tmp_path / "cat" / f"{i:02d}.png")
        Image.new("RGB", (48, 40), (7 * i, 255 - 7 * i, 90)).save(paths[-1])
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    cam = tmp_path / "cam.png"
    assert main(["predict", str(result.run_dir), str(bad), str(tmp_path / "cat"), "--gradcam", str(cam),
                 "--device", "cpu"]) == 2  # the bad file
    assert capsys.readouterr().out.splitlines()[-1] == f"Grad-CAM of {GRADCAM_IMAGES} images: {cam}"
    with Image.open(cam) as img:
        img.verify()
    # the figure: the first 32 images read, each under its Grad-CAM for the class predicted
    model, recipe = load_weights(result.run_dir)
    predictions = list(predict_files(model, [str(bad), *map(str, paths)], recipe.class_names, recipe.normalization))
    axes = [ax for ax in gradcam_figure(model, predictions, recipe.normalization).axes if ax.images]
    assert len(axes) == GRADCAM_IMAGES
    for ax, p in zip(axes, predictions[1:], strict=False):
        name, probability = p.top[0]
        assert ax.get_title() == f"cat/{p.path[-6:]}\n{name} {probability:.0%}"
        x = normalize(p.image[None], normalization=recipe.normalization)
        expected = grad_cam(model, model.layer3, x, torch.tensor([recipe.class_names.index(name)]))[0]
        assert torch.allclose(torch.as_tensor(ax.images[1].get_array()), expected, atol=1e-6)
    # with --json the output stays JSON lines; a name that is not a PNG's, or in no folder, is refused first
    assert main(["predict", str(result.run_dir), str(paths[0]), "--gradcam", str(cam), "--json"]) == 0
    assert [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()] == [str(paths[0])]
    for name in ("cam.jpg", "missing/cam.png", "cat"):
        assert main(["predict", str(result.run_dir), str(paths[0]), "--gradcam", str(tmp_path / name)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == (
            f"cifar-onecycle: error: --gradcam {tmp_path / name}: give a .png file's name in a folder that exists\n")
    assert not (tmp_path / "cam.jpg").exists()


def test_tensorboard_scalars_or_a_clear_error(tmp_path, capsys):
    from conftest import write_cifar

    data = write_cifar(tmp_path / "data").parent
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(data), "--out", str(out), "--tensorboard", "--quiet", "--epochs", "1",
            "--peak-epoch", "1", "--batch-size", "50", "--lr-max", "0.01", "--device", "cpu"]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert main(args) == 2
        assert "pip install 'cifar-onecycle[tensorboard]'" in capsys.readouterr().err
        assert not out.exists()
        return
    assert main(args) == 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100


class NearTie(nn.Module):
    """Logits 1.0 and 1.002: apart in fp32, one and the same number in bf16 (whose step at 1 is
    1/128), where the tie goes to class 0."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [1.002]]))

    def forward(self, x):
        return self.head(x.new_ones(len(x), 1))


def test_predictions_are_computed_as_the_evaluation_computes_them():
    from cifar_onecycle.evaluation import evaluate
    from cifar_onecycle.report import predict_probabilities

    images, labels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)
    for precision, predicted in (("bf16", 0), ("fp32", 1)):
        assert evaluate(NearTie(), images, labels, precision=precision)[1] == (predicted == 0)
        assert predict_probabilities(NearTie(), images, precision=precision).argmax(1).tolist() == [predicted] * 4


@pytest.mark.slow
def test_the_report_counts_mistakes_in_the_runs_own_precision(tmp_path, monkeypatch, capsys):
    import cifar_onecycle.report as report
    from conftest import write_cifar

    asked = []
    real = report.predict_probabilities

    def spy(model, images, batch_size=500, precision="fp32", channels_last=True, *rest):
        asked.append(precision)
        return real(model, images, batch_size, precision, channels_last, *rest)

    import cifar_onecycle.training as training
    from cifar_onecycle import load_cifar10

    handed = []
    write_report = training.write_report
    monkeypatch.setattr(training, "write_report", lambda *a: handed.append(a[-1]) or write_report(*a))
    monkeypatch.setattr(report, "predict_probabilities", spy)
    data = write_cifar(tmp_path / "data").parent
    # One step of 10 images: an AVX2-only CPU emulates bf16 (46 s for this test with 4 steps of 25
    # there, 23 s with one)
    run = train(TINY.replace(precision="bf16", epochs=1, peak_epoch=1, train_subset=10, batch_size=10), data_dir=data,
                download=False, out=tmp_path / "run", progress=False)
    # The run's report took the predictions of the final evaluation's pass (no pass of its own), so
    # its mistakes are those the accuracy counted.
    labels = load_cifar10(data, download=False).test_labels
    assert asked == [] and int((handed[0].argmax(1) == labels).sum()) / len(labels) == run.summary["final_test_acc"]
    assert main(["report", str(tmp_path / "run"), "--data-dir", str(data), "--device", "cpu"]) == 0
    assert main(["report", str(tmp_path / "run"), "--data-dir", str(data), "--device", "cpu",
                 "--precision", "fp32"]) == 0
    assert asked == ["bf16", "fp32"]  # the report command: by default in the run's own precision, then as asked


def test_the_curves_tick_whole_epochs_only():
    from cifar_onecycle.report import plot_curves
    from cifar_onecycle.results import EpochMetrics

    history = [EpochMetrics(1, 0.1, 2.0, 0.3, 1.9, 0.35, 12.5, 40.0),
               EpochMetrics(2, 0.2, 1.5, 0.5, 1.4, 0.55, 12.0, 41.5)]
    for ax in plot_curves(history).axes:
        assert all(float(tick).is_integer() for tick in ax.get_xticks()), ax.get_xticks()  # no epoch 1.2


def test_the_lr_schedule_graph_passes_through_every_steps_lr_and_stays_small():
    import numpy as np

    from cifar_onecycle.recipe import MAX_EPOCHS
    from cifar_onecycle.report import plot_lr_schedule
    from cifar_onecycle.schedule import lr_at, one_cycle_knots

    recipe, steps_per_epoch = Recipe(), 97
    line = plot_lr_schedule(recipe, steps_per_epoch).lines[0]
    assert len(line.get_xdata()) == 3  # the knots: start, peak, end
    knots = one_cycle_knots(recipe.epochs, steps_per_epoch, recipe.peak_epoch, recipe.lr_min, recipe.lr_max)
    steps = np.arange(recipe.epochs * steps_per_epoch)
    drawn = np.interp(steps + 1, line.get_xdata(), line.get_ydata())  # the graph counts steps from 1
    assert np.allclose(drawn, [lr_at(int(step), knots) for step in steps], rtol=0, atol=1e-12)
    # a summary.json from elsewhere may claim any number of steps: the graph stays as small (the
    # recipe's own bound on epochs, 10,000, times 10**9 steps an epoch)
    assert len(plot_lr_schedule(Recipe(epochs=MAX_EPOCHS, peak_epoch=5), 10**9).lines[0].get_xdata()) == 3


def test_a_cycling_momentum_is_drawn_beside_the_lr_and_named_in_the_report(tmp_path):
    import numpy as np

    from cifar_onecycle.report import plot_lr_schedule, report_markdown
    from cifar_onecycle.results import EpochMetrics

    recipe, steps_per_epoch = Recipe(momentum=0.95, momentum_at_peak=0.85), 97
    ax = plot_lr_schedule(recipe, steps_per_epoch)
    assert len(ax.figure.axes) == 2  # the LR's and the momentum's (right)
    momentum = next(a for a in ax.figure.axes if a is not ax and a.lines).lines[0]
    steps = np.arange(recipe.epochs * steps_per_epoch)
    drawn = np.interp(steps + 1, momentum.get_xdata(), momentum.get_ydata())
    cycle = recipe.one_cycle(steps_per_epoch)
    assert np.allclose(drawn, [cycle.momentum(int(step)) for step in steps], rtol=0, atol=1e-12)
    assert len(plot_lr_schedule(Recipe(), steps_per_epoch).figure.axes) == 1  # the seed's: no momentum axis
    history = [EpochMetrics(1, 0.05, 2.0, 0.3, 1.9, 0.35, 1.0, 100.0)]
    md = report_markdown(recipe, history, {"final_test_acc": 0.35}, "table", ["crop"], tmp_path)
    assert "SGD, momentum 0.95 at LRMIN to 0.85 at LRMAX (cyclical) (Nesterov)" in md
    assert "SGD, momentum 0.9 (Nesterov)" in report_markdown(Recipe(), history, {"final_test_acc": 0.35}, "table",
                                                             ["crop"], tmp_path)


def test_the_reports_counts_of_images_read_as_the_rest_of_the_page(tmp_path):
    from cifar_onecycle.report import report_markdown
    from cifar_onecycle.results import EpochMetrics

    history = [EpochMetrics(1, 0.05, 2.0, 0.3, 1.9, 0.35, 1.0, 100.0)]
    summary = {"final_test_acc": 0.35, "test_images": 10000, "final_val_acc": 0.4, "val_images": 5000}
    md = report_markdown(Recipe(holdout=5000), history, summary, "table", ["crop"], tmp_path)
    assert "Test images: 10,000." in md and "On the 5,000 held-out validation images" in md
    # a summary.json from elsewhere may hold anything there
    md = report_markdown(Recipe(holdout=5000), history, summary | {"test_images": "x", "val_images": True}, "table",
                         ["crop"], tmp_path)
    assert "Test images: ?." in md and "On the ? held-out validation images" in md



@pytest.mark.parametrize("lookahead,bn_batches", [(False, 0), (True, 0), (True, 2)])
def test_the_report_says_whether_the_trained_weights_score_apart_from_the_average(tmp_path, lookahead, bn_batches):
    from cifar_onecycle.report import report_markdown
    from cifar_onecycle.results import EpochMetrics

    # With its statistics recomputed, lookahead's average is no longer the trained weights.
    recipe = TINY.replace(ema_decay=0.9, ema_lookahead=lookahead, ema_bn_batches=bn_batches)
    written_back = lookahead and not bn_batches
    history = [EpochMetrics(1, 0.05, 2.0, 0.3, 1.9, 0.35, 1.0, 100.0)]
    summary = {"final_test_acc": 0.35, "final_test_acc_without_ema": 0.35 if written_back else 0.33}
    md = report_markdown(recipe, history, summary, "table", ["crop"], tmp_path)
    if written_back:
        assert "which lookahead wrote back into the trained weights" in md and "alone score" not in md
    else:
        assert "the trained weights alone score 33.00%" in md


def test_predict_refuses_a_gradcam_folder_it_cannot_write_before_reading_any_image(run, tmp_path, capsys,
                                                                                   monkeypatch):
    import tempfile

    result, _ = run
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / ".write-test").write_text("the user's")
    # the proof that the folder can be written leaves the files there as they were
    assert main(["predict", str(result.run_dir), str(image), "--gradcam", str(shared / "cam.png")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in shared.iterdir()) == [".write-test", "cam.png"]
    assert (shared / ".write-test").read_text() == "the user's"
    mkstemp = tempfile.mkstemp
    locked = tmp_path / "locked"
    locked.mkdir()

    def no_permission(*args, dir=None, **kwargs):  # as chmod 555 would, for a user other than root
        if dir is not None and Path(dir) == locked:
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", no_permission)
    assert main(["predict", str(result.run_dir), str(image), "--gradcam", str(locked / "cam.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"cifar-onecycle: error: --gradcam {locked}: cannot write there (Permission denied); choose another folder\n")
    assert list(locked.iterdir()) == []
