"""Files from someone else: a FIFO never hangs a reader, a data folder named by a run's file is read,
never created, counts and reals from flags and files are bounded, and predict sees an image as a
viewer shows it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_onecycle import Recipe, ResNet9
from cifar_onecycle.checkpoint import save_weights
from cifar_onecycle.cli import main
from cifar_onecycle.images import load_image
from cifar_onecycle.run_folder import RunFolder
from conftest import ROOT


def weights_folder(path, model=None):
    path.mkdir(parents=True, exist_ok=True)
    save_weights(model or ResNet9(), path / "model.safetensors", Recipe())
    return path


def fifo(path):
    os.mkfifo(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["weights", "recipe", "checkpoint", "image", "archive"])
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(tmp_path, case):
    run = tmp_path / "run"
    if case == "weights":
        run.mkdir()
        fifo(run / "model.safetensors")
        args = ["evaluate", str(run), "--data-dir", str(tmp_path / "data"), "--no-download"]
    elif case == "recipe":
        args = ["train", "--recipe", str(fifo(tmp_path / "r.toml")), "--out", str(run)]
    elif case == "checkpoint":
        RunFolder.create(run).write_recipe(Recipe())
        fifo(run / "checkpoint.pt")
        args = ["train", "--resume", str(run)]
    elif case == "image":
        weights_folder(run)
        args = ["predict", str(run), str(fifo(tmp_path / "photo.png")), "--device", "cpu"]
    else:
        (tmp_path / "data").mkdir()
        fifo(tmp_path / "data" / "cifar-10-python.tar.gz")
        args = ["train", "--data-dir", str(tmp_path / "data"), "--no-download", "--out", str(run)]
    done = subprocess.run([sys.executable, "-m", "cifar_onecycle", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not a regular file but a FIFO" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_data_folder_a_run_recorded_is_read_never_created(tmp_path, capsys):
    gone = tmp_path / "elsewhere" / "data"
    seeds = RunFolder.create(tmp_path / "seeds")
    seeds.write_recipe(Recipe())
    seeds.write_seeds(0, 2, str(gone))
    assert main(["train", "--resume", str(seeds.path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"names the data folder {gone}, which is not there; give --data-dir" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "elsewhere").exists()
    run = RunFolder(weights_folder(tmp_path / "run"))
    run.write_summary({"steps_per_epoch": 97, "final_test_acc": 0.5, "total_seconds": 1.0, "data_dir": str(gone)})
    from cifar_onecycle.results import EpochMetrics
    run.write_metrics([EpochMetrics(1, 0.1, 2.0, 0.3, 1.9, 0.35, 1.0, 10.0)])
    assert main(["report", str(run.path), "--device", "cpu"]) == 2
    assert "which is not there; give --data-dir" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--epochs", "9" * 400], "epochs must lie in 1..10,000, got an integer of 400 digits"),
    (["train", "--epochs", "20000", "--peak-epoch", "1"], "epochs must be at most 10,000, got 20000"),
    (["train", "--eval-batch-size", str(10**9)], "eval_batch_size must be at most 65,536"),
    (["train", "--batch-size", "100000"], "batch_size must be at most 65,536"),
    (["lr-find", "--num-iter", str(10**10)], "--num-iter must be >= 10 and at most 1,000,000"),
    (["lr-find", "--sweep-epochs", "nan"], "--sweep-epochs must lie in (0, 1000], got nan"),
    (["lr-find", "--sweep-epochs", "1e9"], "--sweep-epochs must lie in (0, 1000]"),
])
def test_counts_and_reals_are_bounded_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*argv, "--data-dir", str(tmp_path / "none"), "--no-download", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "none").exists()


def test_a_recipe_file_cannot_ask_for_a_huge_evaluation_batch(tmp_path):
    from cifar_onecycle import RecipeError, load_recipe

    (tmp_path / "r.toml").write_text(f"eval_batch_size = {10**9}\n")
    with pytest.raises(RecipeError, match="eval_batch_size must be at most 65,536"):
        load_recipe(tmp_path / "r.toml")


def test_running_out_of_cpu_memory_is_one_line(monkeypatch, capsys):
    import cifar_onecycle.cli as cli

    def exhausted(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 161061273600 bytes.")

    monkeypatch.setattr(cli, "cmd_summary", exhausted)
    assert main(["summary"]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--batch-size" in err and len(err.strip().splitlines()) == 1


def asymmetric(width=64, height=48):
    """A picture whose orientation matters: a red left third, a green top band, the rest blue."""
    a = np.zeros((height, width, 3), np.uint8)
    a[...] = (20, 40, 200)
    a[:, : width // 3] = (220, 30, 30)
    a[: height // 4] = (30, 200, 60)
    return Image.fromarray(a)


def test_predict_applies_the_exif_orientation(tmp_path):
    plain = asymmetric()
    plain.save(tmp_path / "plain.png")
    # Stored on its side, with the tag that tells a viewer to turn it 90 degrees clockwise.
    exif = Image.Exif()
    exif[0x0112] = 6
    plain.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    assert torch.equal(load_image(tmp_path / "phone.png"), load_image(tmp_path / "plain.png"))


def test_predict_sees_16_bit_and_transparent_images_as_a_viewer_does(tmp_path):
    grey = np.random.default_rng(0).integers(60, 200, size=(40, 40)).astype(np.uint16)
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "eight.png")
    Image.fromarray(grey * 257).save(tmp_path / "sixteen.png")  # uint16: a 16-bit PNG
    eight, sixteen = load_image(tmp_path / "eight.png"), load_image(tmp_path / "sixteen.png")
    assert (eight.int() - sixteen.int()).abs().max() <= 1  # not clipped to white
    assert 100 < float(sixteen.float().mean()) < 160
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent: a viewer shows its background
    clear.save(tmp_path / "clear.png")
    assert torch.equal(load_image(tmp_path / "clear.png"), torch.full((3, 32, 32), 255, dtype=torch.uint8))


def test_names_that_are_not_plain_text_are_shown_escaped_each_on_one_line(tmp_path, capsys):
    """A file name may hold a newline, a terminal's escape or bytes that are not UTF-8 (surrogates in
    Python): each is shown as its escape, and a strict UTF-8 standard output (pytest's) stops nothing."""
    run = weights_folder(tmp_path / "run")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("not-utf8-\udcff.png", "two\nlines.png", "red-\x1b[31m.png"):
        asymmetric().save(images / name)
    (images / "broken\n.png").write_bytes(b"not an image")
    assert main(["predict", str(run), str(images), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and "\x1b" not in out
    assert f"{images}/not-utf8-\\udcff.png: " in out and f"{images}/two\\nlines.png: " in out
    assert err.startswith(f"cifar-onecycle: error: {images}/broken\\n.png: not an image Pillow can read (")
    assert err.count("\n") == 1
    sweep = tmp_path / "sweep-\udcff"  # a line that is not escaped: the output's own errors
    assert main(["sweep", "--vary", "lr_max=0.1,0.2", "--out", str(sweep), "--print-commands", "--no-download",
                 "--data-dir", str(tmp_path)]) == 0
    assert "sweep-\\udcff/lr_max=0.1/seed0" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "no\nrun")]) == 2  # any command's error
    err = capsys.readouterr().err
    assert err.startswith("cifar-onecycle: error: ") and err.count("\n") == 1 and "no\\nrun" in err


def test_predict_with_weights_that_hold_nan_is_an_error_and_json_stays_json(tmp_path, capsys):
    model = ResNet9()
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    run = weights_folder(tmp_path / "run", model)
    asymmetric().save(tmp_path / "photo.png")
    assert main(["predict", str(run), str(tmp_path / "photo.png"), "--json", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    line = json.loads(captured.out)  # valid JSON: no NaN
    assert "not finite" in line["error"] and "nan%" not in captured.err


def test_a_recipe_file_is_flat_lines_checked_before_the_toml_parser(tmp_path):
    from cifar_onecycle import RecipeError, load_recipe

    path = tmp_path / "r.toml"
    # One dotted key: the TOML parser's work grows with the square of its length (100,000 parts took
    # over 8 GB); 1,000 parts are enough to show the line is refused before parsing.
    path.write_text(".".join(["a"] * 1000) + " = 1\n")
    with pytest.raises(RecipeError, match="line 1 is not 'setting = value'"):
        load_recipe(path)
    for text in ("[table]\nlr_max = 0.1\n", "classes = [[0.1]]\n", "x = {a = 1}\n", "lr_max = 0.1\n" * 1001):
        path.write_text(text)
        with pytest.raises(RecipeError, match="not 'setting = value'|lines; a recipe holds"):
            load_recipe(path)
    path.write_text("lr_max = [0.1]\n")  # a flat array passes the structure check, then the setting's own
    with pytest.raises(RecipeError, match="lr_max must be float"):
        load_recipe(path)
    path.write_text("# a comment\n\nlr_max = 0.3  # the peak\ndevice = \"cpu\"\n")
    assert load_recipe(path).lr_max == 0.3  # what recipe.toml and the shipped recipes look like


ARRAY_LINES = {
    'classes = ["cat", "a \\"quoted\\" dog", "back\\\\slash", "\\u00e9t\\u00e9"]': True,
    "mean = [0.4914, -0.48, 4.465e-1, +1_000]": True,
    "k = []": True,
    "k = [ 1 , 2 , ]  # a note, with \"a string\", and ]": True,
    "k = [[1]]": False,
    "k = [1 2]": False,
    'k = ["unterminated]': False,
    'k = ["a" "b"]': False,
    'k = ["a\\"]': False,
    "k = [,]": False,
    "k = [{a = 1}]": False,
    "k = [x]": False,
    "k = [1] extra": False,
    "k.j = [1]": False,
}


@pytest.mark.parametrize("line", ARRAY_LINES)
def test_a_recipe_line_may_be_a_flat_array_of_strings_and_numbers(line):
    from cifar_onecycle.recipe import _flat_array, tomllib  # tomli on Python 3.10

    assert _flat_array(line) is ARRAY_LINES[line]
    if ARRAY_LINES[line]:
        (value,) = tomllib.loads(line).values()  # what the check passes, TOML reads as one flat list
        assert isinstance(value, list) and not any(isinstance(v, list | dict) for v in value)
    # 150 items: more than one group of the items the check matches at a time
    long = line.replace("[", "[" + "7, " * 150, 1)
    assert _flat_array(long) is ARRAY_LINES[line]


@pytest.mark.parametrize("line", [
    "k = [" + "1," * 500_000 + "x",  # a million characters of items, then one bad one
    'k = ["' + "a" * 1_000_000 + '"x',  # one long string, then something that is not a comma
    "k = [" + ('"' + "\\a" * 255 + '",') * 2_000 + "x",  # strings of the most escapes allowed
    "k = [" + '"ab", ' * 200_000 + '"a"]',  # good
])
def test_a_long_array_line_is_checked_in_constant_memory(line):
    import tracemalloc

    from cifar_onecycle.recipe import _flat_array

    tracemalloc.start()
    try:
        _flat_array(line)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Measured: under 3.5 MB for any length; a repeat over the whole line holds 190 MB a million characters.
    assert peak < 8e6, f"{peak / 1e6:.0f} MB"


def test_the_package_patterns_run_on_python_3_10():
    """Python 3.10, the oldest supported, has no possessive quantifiers or atomic groups: a pattern
    that uses them fails there at import (as one did), while CI runs a newer Python."""
    import importlib
    import pkgutil
    import re

    import cifar_onecycle

    parser = pytest.importorskip("re._parser")  # 3.11 on; on 3.10 the import itself is the check
    new_in_3_11 = {parser.POSSESSIVE_REPEAT, parser.ATOMIC_GROUP}

    def opcodes(tree):
        for op, arguments in tree:
            yield op
            for argument in arguments if isinstance(arguments, tuple | list) else ():
                if isinstance(argument, parser.SubPattern):
                    yield from opcodes(argument)
                elif isinstance(argument, list):  # a branch's alternatives
                    for branch in argument:
                        if isinstance(branch, parser.SubPattern):
                            yield from opcodes(branch)

    modules = [importlib.import_module(info.name) for info in pkgutil.walk_packages(cifar_onecycle.__path__,
               "cifar_onecycle.") if info.name != "cifar_onecycle.__main__"]  # which would run the CLI
    patterns = [value for module in modules for value in vars(module).values() if isinstance(value, re.Pattern)]
    assert len(patterns) >= 4
    for pattern in patterns:
        used = new_in_3_11 & set(opcodes(parser.parse(pattern.pattern, pattern.flags)))
        assert not used, f"{pattern.pattern[:80]!r} uses {used}"


def test_json_from_a_file_is_bounded_in_depth_and_digits(tmp_path, capsys):
    from cifar_onecycle.files import parse_json

    assert parse_json('{"a": [1, {"b": "[[[["}], "c": -123}') == {"a": [1, {"b": "[[[["}], "c": -123}
    with pytest.raises(ValueError, match="nested more than 32 deep"):
        parse_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="an integer of 31 digits"):
        parse_json('{"seed": 1234567890123456789012345678901}')
    run = RunFolder(weights_folder(tmp_path / "run"))
    (run.path / "summary.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert main(["report", str(run.path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nested more than 32 deep" in err and len(err.strip().splitlines()) == 1


def test_an_image_pillow_refuses_is_named_with_pillows_reason(tmp_path, capsys):
    """A PNG whose text chunk would decompress to 100 MB (Pillow stops at 1 MB): the line says what
    is wrong, in Pillow's words, cut short; a file that is no image at all says just that."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = tmp_path / "plain.png"
    Image.new("RGB", (32, 32)).save(png)
    raw = png.read_bytes()  # the signature (8 bytes) and IHDR (25) first
    bomb = chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * (100 << 20), 9))
    (tmp_path / "text-bomb.png").write_bytes(raw[:33] + bomb + raw[33:])
    (tmp_path / "no-image.png").write_bytes(b"not an image")
    for name, reason in (("text-bomb.png", "(ValueError: Decompressed data too large"),
                         ("no-image.png", "(UnidentifiedImageError)\n")):  # its words would repeat the path
        assert main(["predict", str(weights_folder(tmp_path / "run")), str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        said = f"cifar-onecycle: error: {tmp_path / name}: not an image Pillow can read "
        # Pillow's words in its own case (9.1: "Decompressed Data Too Large")
        assert err.startswith(said) and err[len(said):].lower().startswith(reason.lower()), err
        assert err.count("\n") == 1 and len(err) < len(str(tmp_path / name)) + 300


def test_a_name_from_outside_is_drawn_as_itself(tmp_path):
    # Between two dollar signs matplotlib reads a formula: a class folder or image file named
    # "$\frac$" raised ValueError as its picture was saved (a run's report at its end, predict --gradcam).
    from cifar_onecycle.augment import CIFAR10_NORMALIZATION
    from cifar_onecycle.predict import gradcam_figure, predict_files
    from cifar_onecycle.report import plot_confusion, plot_misclassified, save_png

    classes = ["$\\frac$", "x$_1$"]
    model = ResNet9(num_classes=2).eval()
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    labels = torch.tensor([0, 1])
    mistaken = plot_misclassified(model, images, labels, classes=classes,
                                  probabilities=torch.tensor([[0.1, 0.9], [0.8, 0.2]]))
    save_png(mistaken, tmp_path / "misclassified.png")
    assert mistaken.axes[0].get_title() == "true: \\$\\frac\\$\npred: x\\$_1\\$ (90%)"
    confusion = plot_confusion(torch.tensor([[1, 0], [1, 0]]), classes)
    save_png(confusion.figure, tmp_path / "confusion.png")
    assert [t.get_text() for t in confusion.get_xticklabels()] == ["\\$\\frac\\$", "x\\$_1\\$"]
    (tmp_path / "a$b").mkdir()
    photo = tmp_path / "a$b" / "$\\frac$.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(photo)
    predictions = list(predict_files(model, [str(photo)], classes, CIFAR10_NORMALIZATION))
    cam = gradcam_figure(model, predictions, CIFAR10_NORMALIZATION)
    save_png(cam, tmp_path / "cam.png")
    assert cam.axes[0].get_title().startswith("a\\$b/\\$\\frac\\$.png\n")


def test_a_name_from_outside_stays_in_its_cell_of_a_page(tmp_path):
    from cifar_onecycle.report import markdown_table

    # report.md, seeds.md and sweep.md are pages for a README: a "|" would end the cell, and GitHub
    # reads the text between two "$" as a formula
    assert markdown_table([["class", "taken for"], ["c|d", "$x_1$"]]) == [
        "| class | taken for |", "| --- | --- |", "| c\\|d | \\$x_1\\$ |"]
