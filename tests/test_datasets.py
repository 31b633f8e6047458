"""CIFAR-100 and a folder of the user's own images: read, checked, cached, trained on, and named by
the run's recipe everywhere after (evaluate, report, predict)."""
import os
import pickle
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_onecycle import Recipe, train
from cifar_onecycle.checkpoint import load_weights
from cifar_onecycle.cli import main
from cifar_onecycle.data import CIFAR100, DatasetError, load_source
from cifar_onecycle.datasets import channel_stats, load_dataset
from cifar_onecycle.image_folder import CACHE, load_folder
from cifar_onecycle.images import load_image
from cifar_onecycle.recipe import CIFAR100_CLASSES, load_recipe
from cifar_onecycle.report import plot_confusion
from conftest import Payload

TINY = Recipe(epochs=1, peak_epoch=1, batch_size=20, eval_batch_size=50, device="cpu", precision="fp32",
              lr_max=0.02, logit_scale=0.125)


def cifar100_file(n: int, seed: int, changes: dict | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    fine = [i % 100 for i in range(n)]
    batch = {b"filenames": [f"img{i}.png".encode() for i in range(n)], b"batch_label": b"training batch 1 of 1",
             b"fine_labels": fine, b"coarse_labels": [y // 5 for y in fine],
             b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
    batch.update(changes or {})
    return pickle.dumps(batch, protocol=4)


def write_cifar100(root: Path, train: int = 200, test: int = 100) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(cifar100_file(train, 1))
    (folder / "test").write_bytes(cifar100_file(test, 2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES]}))
    return root


def test_cifar100_loads_its_fine_labels_from_the_folder_or_the_archive(tmp_path):
    data = load_source(CIFAR100, write_cifar100(tmp_path / "a"), download=False)
    assert data.train_images.shape == (200, 3, 32, 32) and data.test_images.shape == (100, 3, 32, 32)
    assert data.train_labels.tolist()[:3] == [0, 1, 2] and int(data.train_labels.max()) == 99
    assert data.classes == CIFAR100_CLASSES and data.classes[19] == "cattle"
    archive = tmp_path / "b" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "a" / "cifar-100-python", arcname="cifar-100-python")
    again = load_dataset(Recipe(dataset="cifar100"), archive.parent, download=False)
    assert torch.equal(again.train_images, data.train_images) and torch.equal(again.test_labels, data.test_labels)


@pytest.mark.parametrize("damage, message", [
    ({b"fine_labels": [100] * 200}, "labels must lie in 0..99"),
    ({b"fine_labels": None}, "labels must be a list of integers"),
    ({b"data": Payload("/tmp/cifar100-payload-ran")}, "refused"),
])
def test_a_hostile_cifar100_file_is_one_line(tmp_path, capsys, damage, message):
    root = write_cifar100(tmp_path)
    (root / "cifar-100-python" / "train").write_bytes(cifar100_file(200, 1, damage))
    assert main(["train", "--dataset", "cifar100", "--data-dir", str(root), "--no-download", "--out",
                 str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "cifar-100-python/train" in err and len(err.splitlines()) == 1
    assert not Path("/tmp/cifar100-payload-ran").exists() and not (tmp_path / "run").exists()


def test_a_cifar100_run_has_100_outputs_and_records_its_classes_and_statistics(tmp_path, capsys):
    root = write_cifar100(tmp_path)
    result = train(TINY.replace(dataset="cifar100"), data_dir=root, download=False, out=tmp_path / "run",
                   progress=False, report=False)
    assert result.model.fc.out_features == 100
    model, recipe = load_weights(tmp_path / "run")
    assert model.fc.out_features == 100 and recipe.classes == CIFAR100_CLASSES
    data = load_source(CIFAR100, root, download=False)
    assert (recipe.mean, recipe.std) == channel_stats(data.train_images)  # its own, not CIFAR-10's
    assert recipe.mean != (0.4914, 0.4822, 0.4465) and 0.45 < recipe.mean[0] < 0.55  # uniform noise
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "x.png"), "--device", "cpu"]) == 0
    top = capsys.readouterr().out.split(":")[1].split()[0]
    assert top in CIFAR100_CLASSES


@pytest.mark.slow  # six runs of a 6.6M-parameter model, a step each
def test_the_seeds_of_a_set_and_the_runs_of_a_sweep_share_one_pass_for_the_statistics(tmp_path, monkeypatch):
    import cifar_onecycle.datasets as datasets
    from cifar_onecycle import sweep, train_seeds

    root = write_cifar100(tmp_path, test=20)
    passes = []
    monkeypatch.setattr(datasets, "channel_stats", lambda images: passes.append(len(images)) or channel_stats(images))
    # one step of 20 a run: the statistics are those of the images a run trains on, its subset's
    recipe = TINY.replace(dataset="cifar100", batch_size=20, train_subset=20)
    seeds = train_seeds(recipe, 2, out=tmp_path / "seeds", data_dir=root, download=False, progress=False, report=False)
    assert passes == [20]
    first = load_recipe(tmp_path / "seeds" / "seed0" / "recipe.toml")
    assert (first.mean, first.std) == channel_stats(load_source(CIFAR100, root, download=False).train_images[:20])
    assert len(seeds.runs) == 2
    passes.clear()  # one pass for each split of the grid: two holdouts, each under two LRs
    result = sweep(recipe.replace(holdout=100), {"holdout": [100, 150], "lr_max": [0.01, 0.02]},
                   out=tmp_path / "sweep", data_dir=root, download=False, progress=False)
    assert passes == [20, 20] and len(result.rows) == 4


def test_channel_stats_are_those_computed_by_hand():
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = 255                     # red all on: mean 1, std 0 (kept finite)
    images[:2, 1] = 255                    # green on in half: mean 0.5, std 0.5
    images[:, 2, 0, 0] = 51                # blue 0.2 in a quarter of the pixels
    mean, std = channel_stats(images, chunk=3)  # chunks that do not divide the set
    blue_std = (0.25 * 0.04 - 0.05**2) ** 0.5
    assert mean == (1.0, 0.5, 0.05) and std == (1e-4, 0.5, round(blue_std, 4))


# ---- folders ---------------------------------------------------------------------------------------

def image(path: Path, size=(32, 32), mode="RGB", colour=(200, 30, 30), fmt=None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], 40000, np.uint16))
    else:
        img = Image.new("RGB", size, colour).convert(mode)
    img.save(path, format=fmt, **save)
    return path


def folder(root: Path, classes=("cat", "dog"), per_class=3, test_classes=None) -> Path:
    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "owl": (30, 30, 200)}
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for name in names:
            for i in range(per_class):
                image(root / split / name / f"{i}.png", colour=colours.get(name, (90, 90, 90)))
    return root


def test_a_folder_of_mixed_sizes_modes_and_formats_reads_as_a_viewer_shows_it(tmp_path):
    root = folder(tmp_path / "d")
    cat = root / "train" / "cat"
    image(cat / "wide.jpg", size=(96, 48), fmt="JPEG", quality=95)      # shorter side to 32, centre crop
    image(cat / "grey.webp", mode="L", fmt="WEBP", lossless=True)
    image(cat / "clear.png", mode="RGBA")
    image(cat / "deep.png", mode="I;16")                                # 16-bit grey, not clipped white
    image(cat / "palette.gif", mode="P", fmt="GIF")
    image(cat / "old.bmp", fmt="BMP")
    image(cat / "nested" / "deeper.png")                                # sub-folders of a class count
    (cat / "notes.txt").write_text("not an image")                      # other kinds of file are not images
    image(cat / ".hidden.png")
    data = load_folder(root)
    assert data.classes == ("cat", "dog")
    assert data.train_images.shape == (3 + 7 + 3, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert sorted(data.train_labels.tolist()) == [0] * 10 + [1] * 3 and data.test_labels.tolist() == [0] * 3 + [1] * 3
    names = ("wide.jpg", "grey.webp", "clear.png", "deep.png", "palette.gif", "old.bmp", "nested/deeper.png")
    by_name = {name: load_image(cat / name) for name in names}
    for name, pixels in by_name.items():  # each one among the cat images the set holds
        assert any(torch.equal(pixels, held) for held in data.train_images[data.train_labels == 0]), name
    assert (by_name["deep.png"] == round(40000 / 257)).all()            # a viewer's grey, not white
    grey = by_name["grey.webp"].float().mean(dim=(1, 2))
    assert torch.allclose(grey, grey[0].expand(3), atol=1)
    assert (by_name["old.bmp"][:, 0, 0] == torch.tensor([200, 30, 30])).all()
    assert (by_name["wide.jpg"][0].float().mean() - 200).abs() < 4     # JPEG is lossy, the colour stays


@pytest.mark.parametrize("case, message", [
    ("missing-class-in-test", "train/ and test/ must have the same classes; only in train: owl"),
    ("empty-class", "train/owl: no images"),
    ("bad-file", "0.png: not an image Pillow can read"),
    ("one-class", "1 class folders; give 2"),
    ("no-test", "no test/ folder"),
    ("name-not-utf8", "has a name that is not UTF-8"),
    ("train-given", "/d/train: no train/ folder; a folder of images holds train/<class>/ and test/<class>/ "
                    "(give its parent, "),
])
def test_a_folder_that_cannot_be_a_data_set_is_one_line(tmp_path, capsys, case, message):
    root = folder(tmp_path / "d", classes=("cat", "dog", "owl"), test_classes=("cat", "dog"))
    if case == "missing-class-in-test":
        pass
    elif case == "empty-class":
        (root / "test" / "owl").mkdir()
        for p in (root / "train" / "owl").iterdir():
            p.unlink()
    elif case == "bad-file":
        (root / "test" / "owl").mkdir()
        (root / "train" / "owl" / "0.png").write_bytes(b"not a png at all")
    elif case == "one-class":
        root = folder(tmp_path / "e", classes=("cat",))
    elif case == "train-given":  # the split's folder given for the data set's
        root = root / "train"
    elif case == "name-not-utf8":  # a Linux file name may be any bytes; recipe.toml is UTF-8
        root = folder(tmp_path / "g", classes=("cat", "dog", "owl\udcff"))
    else:
        root = tmp_path / "f"
        image(root / "train" / "a" / "0.png")
        image(root / "train" / "b" / "0.png")
    assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--out", str(tmp_path / "run"),
                 "--quiet", "--batch-size", "2", "--eval-batch-size", "8", "--epochs", "1", "--peak-epoch", "1",
                 "--device", "cpu", "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_an_oversized_file_is_refused_unread_and_the_others_keep_their_places(tmp_path, monkeypatch):
    import cifar_onecycle.image_folder as image_folder

    root = folder(tmp_path / "d", per_class=5)
    for i in range(5):  # each training image its own colour, so that a shifted one shows
        image(root / "train" / "cat" / f"{i}.png", colour=(10 * i, 0, 0))
        image(root / "train" / "dog" / f"{i}.png", colour=(0, 10 * i, 0))
    big = image(root / "train" / "dog" / "2.png", size=(64, 64), colour=(0, 20, 0))
    monkeypatch.setattr(image_folder, "MAX_IMAGE_FILE_BYTES", big.stat().st_size - 1)
    monkeypatch.setattr(image_folder, "DECODE_CHUNK", 3)  # chunks that do not divide the split
    read = []
    real = image_folder.load_images
    monkeypatch.setattr(image_folder, "load_images", lambda paths, *a: read.extend(paths) or real(paths, *a))
    with pytest.raises(DatasetError, match=f"2.png: {big.stat().st_size:,} bytes, larger than any image"):
        load_folder(root)
    data = load_folder(root, skip_bad_images=True)
    assert big not in read and data.skipped == (str(big),)
    kept = sorted((p for p in (root / "train").rglob("*.png") if p != big), key=str)
    expected = sorted((tuple(load_image(p)[:, 0, 0].tolist()), p.parent.name) for p in kept)
    assert sorted((tuple(x[:, 0, 0].tolist()), data.classes[y]) for x, y in
                  zip(data.train_images, data.train_labels, strict=True)) == expected


def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path):
    root = folder(tmp_path / "d", per_class=10)
    (root / "train" / "dog" / "3.png").write_bytes(b"\x89PNG broken")
    os.symlink(root / "train" / "dog", root / "train" / "dog" / "loop")   # a link loop: not followed
    os.symlink(tmp_path / "nowhere.png", root / "train" / "cat" / "dangling.png")
    with pytest.raises(DatasetError, match="skip_bad_images"):
        load_folder(root)
    result = train(TINY.replace(dataset="folder", skip_bad_images=True, batch_size=9), data_dir=root, download=False,
                   out=tmp_path / "run", progress=False, report=False)
    assert result.summary["skipped_images"] == 2 and result.summary["train_images"] == 19  # 20 less the broken one
    assert result.recipe.classes == ("cat", "dog")


def test_the_training_images_are_held_in_a_fixed_order_that_mixes_the_classes(tmp_path):
    data = load_folder(folder(tmp_path / "d", classes=("cat", "dog", "owl"), per_class=40))
    # so that train_subset's first N images are a sample of every class, not the first classes' folders
    assert {int(y) for y in data.train_labels[:15]} == {0, 1, 2}
    (tmp_path / "d" / CACHE).unlink()
    moved = tmp_path / "elsewhere"
    (tmp_path / "d").rename(moved)
    assert torch.equal(load_folder(moved).train_labels, data.train_labels)  # the same wherever the folder is


def test_the_cache_is_used_when_it_matches_and_rebuilt_when_it_does_not(tmp_path, monkeypatch):
    import cifar_onecycle.image_folder as image_folder

    root = folder(tmp_path / "d")
    first = load_folder(root)
    assert (root / CACHE).is_file()
    decoded = []
    real = image_folder.load_images
    monkeypatch.setattr(image_folder, "load_images", lambda paths, *a: decoded.extend(paths) or real(paths, *a))
    again = load_folder(root)
    assert decoded == [] and torch.equal(again.train_images, first.train_images)
    image(root / "train" / "dog" / "0.png", colour=(1, 2, 3))        # a file changed: size or time differs
    os.utime(root / "train" / "dog" / "0.png", ns=(1, 1))
    changed = load_folder(root)
    assert len(decoded) == 12 and any((held == torch.tensor([1, 2, 3])[:, None, None]).all()
                                      for held in changed.train_images[changed.train_labels == 1])
    decoded.clear()
    raw = (root / CACHE).read_bytes()
    (root / CACHE).write_bytes(raw[:-100])                            # a damaged cache: rebuilt, not trusted
    assert torch.equal(load_folder(root).train_images, changed.train_images) and len(decoded) == 12
    decoded.clear()
    (root / CACHE).unlink()
    os.mkfifo(root / CACHE)                                           # not a file: read without it, no hang
    assert torch.equal(load_folder(root).train_images, changed.train_images) and len(decoded) == 12


def test_a_folder_run_is_named_by_its_recipe_in_evaluate_report_and_predict(tmp_path, capsys):
    owl = "o\x1bwl"  # a folder's name may hold what a terminal or a font cannot show: shown as its escape
    root = folder(tmp_path / "d", classes=("cat", "dog", owl), per_class=10)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Glyph")  # matplotlib's "Glyph 27 (...) missing from font"
        assert main(["train", "--dataset", "folder", "--data-dir", str(root), "--epochs", "1", "--peak-epoch", "1",
                     "--batch-size", "10", "--eval-batch-size", "30", "--device", "cpu", "--precision", "fp32",
                     "--out", str(tmp_path / "run"), "--quiet"]) == 0
    text = (tmp_path / "run" / "recipe.toml").read_text()
    assert 'classes = ["cat", "dog", "o\\u001bwl"]' in text and "mean = [" in text and 'dataset = "folder"' in text
    assert "# A folder of images with the One Cycle policy" in (tmp_path / "run" / "report.md").read_text()
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--device", "cpu"]) == 0     # its own data, recorded
    assert "on 30 images" in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "run"), str(root / "test" / owl / "1.png"), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split(": ")[1].split()[0] in ("cat", "dog", "o\\x1bwl")
    other = folder(tmp_path / "e", classes=("bat", "cat", "dog"))
    assert main(["evaluate", str(tmp_path / "run"), "--dataset", "folder", "--data-dir", str(other),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "its 3 classes are not the model's 3 (label 0: bat here, cat in the model)" in err


def test_a_folder_run_resumes_bit_for_bit_and_sweeps_with_its_holdout(tmp_path, monkeypatch):
    from cifar_onecycle import sweep
    from cifar_onecycle.errors import Interrupted

    root = folder(tmp_path / "d", classes=("cat", "dog", "owl"), per_class=12)
    recipe = TINY.replace(dataset="folder", epochs=2, batch_size=6, eval_batch_size=30)
    whole = train(recipe, data_dir=root, out=tmp_path / "whole", progress=False, report=False)
    monkeypatch.setenv("CIFAR_ONECYCLE_TEST_SIGNALS", "SIGTERM@7")
    with pytest.raises(Interrupted):
        train(recipe, data_dir=root, out=tmp_path / "cut", progress=False, report=False)
    monkeypatch.delenv("CIFAR_ONECYCLE_TEST_SIGNALS")
    resumed = train(resume=tmp_path / "cut", progress=False, report=False)  # the folder recorded in the checkpoint
    assert [h.train_loss for h in resumed.history] == [h.train_loss for h in whole.history]
    assert resumed.recipe == whole.recipe and resumed.recipe.classes == ("cat", "dog", "owl")
    result = sweep(recipe.replace(epochs=1, holdout=6), {"lr_max": [0.01, 0.02]}, out=tmp_path / "sweep",
                   data_dir=root, progress=False)
    assert len(result.rows) == 2 and all(row["final_val_acc"] is not None for row in result.rows)


def test_the_confusion_matrix_drops_its_counts_beyond_20_classes():
    for n, texts in ((10, 100), (100, 0)):
        cm = torch.randint(0, 5, (n, n))
        ax = plot_confusion(cm, [f"class{i}" for i in range(n)])
        assert len(ax.texts) == texts
        assert len(ax.get_yticklabels()) == n


@pytest.mark.slow  # unpacks and decodes 10,000 JPEGs, and reads the whole set in the official layout: ~20 s
def test_the_proxy_read_as_a_folder_is_the_proxy_converted_to_the_official_format(proxy_dir, tmp_path):
    from conftest import SHARED

    # The whole test set, and one training photo in ten (those whose number ends in 0): all 55,000
    # took 47 s of the suite, most of it making and removing files.
    with tarfile.open(SHARED / "data" / "cifar10-proxy.tar.gz") as tf:
        kept = [m for m in tf if m.name.startswith("test/") or not m.isfile() or m.name.endswith("0.jpg")]
        tf.extractall(tmp_path / "folder", members=kept, filter="data")
    as_folder = load_dataset(Recipe(dataset="folder"), tmp_path / "folder")
    official = load_dataset(Recipe(), proxy_dir, download=False)
    assert as_folder.classes == official.classes and len(as_folder.train_labels) == 5_000
    for name in ("test_images", "test_labels"):  # the converter keeps the test set in path order
        assert torch.equal(getattr(as_folder, name), getattr(official, name)), name

    def images_with_labels(d):  # the converter shuffles the training set: compared as a multiset
        rows = torch.cat([d.train_images.flatten(1), d.train_labels[:, None].to(torch.uint8)], 1).numpy()
        return Counter(row.tobytes() for row in rows)

    unmatched = images_with_labels(as_folder) - images_with_labels(official)
    assert not unmatched, f"{sum(unmatched.values())} of the folder's training images (and labels) not the converter's"
    # So one model scores the same on either: the same tensors through the same recipe.
    model, recipe = Recipe(device="cpu", precision="fp32").model(), Recipe(classes=official.classes)
    from cifar_onecycle.evaluation import evaluate

    scores = [evaluate(model, d.test_images[:250], d.test_labels[:250], normalization=recipe.normalization)
              for d in (as_folder, official)]
    assert scores[0] == scores[1]
