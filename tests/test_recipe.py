import dataclasses
from importlib import resources

import pytest

from cifar_onecycle import Recipe, RecipeError, ResNet9, count_parameters, load_recipe, sweep, train
from cifar_onecycle.cli import main
from cifar_onecycle.recipe import NAMED, as_recipe


def test_defaults_are_the_seed_values():
    r = Recipe()
    assert (r.epochs, r.batch_size, r.lr_min, r.lr_max, r.peak_epoch) == (24, 512, 1e-4, 0.2, 5)
    assert (r.crop, r.crop_padding, r.flip, r.cutout, r.cutout_size) == (True, 4, True, True, 8)
    assert (r.momentum, r.nesterov, r.logit_scale) == (0.9, True, 1.0)


def test_toml_round_trip(tmp_path):
    r = Recipe(epochs=3, peak_epoch=1.5, lr_max=0.4, flip=False, device="cpu")
    p = tmp_path / "r.toml"
    p.write_text(r.to_toml())
    assert load_recipe(p) == r
    # the data settings are left to the data (None, which TOML cannot write) until a run records them
    assert len(r.to_toml().splitlines()) == len(dataclasses.fields(Recipe)) - 3
    recorded = r.replace(dataset="folder", classes=("a \"quoted\" name", "tab\there", "ünï", "[x]", "#"),
                         mean=(0.5, 0.25, 0.125), std=(0.2, 0.3, 1))
    p.write_text(recorded.to_toml())
    assert load_recipe(p) == recorded and len(recorded.to_toml().splitlines()) == len(dataclasses.fields(Recipe))


def test_toml_overrides_defaults_and_ints_become_floats(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("lr_max = 1\nepochs = 30\n")
    r = load_recipe(p)
    assert r.lr_max == 1.0 and isinstance(r.lr_max, float) and r.epochs == 30 and r.batch_size == 512


@pytest.mark.parametrize("text, message", [
    ("lr_mx = 0.1\n", "unknown key 'lr_mx'"),
    ("epochs = 'ten'\n", "epochs must be int"),
    ("flip = 1\n", "flip must be bool"),
    ("epochs = [\n", "not valid TOML"),
    ("epochs = 20000\n", "epochs must be at most 10,000"),
])
def test_bad_toml(tmp_path, text, message):
    p = tmp_path / "r.toml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=message) as refused:
        load_recipe(p)
    assert str(refused.value).startswith(f"{p}: ")  # the file named once: a run folder's may be someone else's
    assert str(p) not in str(refused.value)[len(str(p)):]


def test_a_runs_folder_given_for_its_recipe_names_the_file_to_give(tmp_path):
    run = tmp_path / "run"  # README: --recipe RUN_DIR/recipe.toml repeats a run; RUN_DIR is an easy slip
    run.mkdir()
    (run / "recipe.toml").write_text(Recipe().to_toml())
    with pytest.raises(RecipeError) as refused:
        load_recipe(run)
    assert str(refused.value) == f"{run}: a run's folder, not a recipe file; give its recipe: {run / 'recipe.toml'}"
    assert load_recipe(run / "recipe.toml") == Recipe()


@pytest.mark.parametrize("changes, message", [
    (dict(peak_epoch=25), "peak_epoch 25 must lie in"),
    (dict(epochs=2), "peak_epoch 5 must lie in"),
    (dict(batch_size=0), "batch_size must be > 0"),
    (dict(epochs=0), "epochs must be > 0"),
    (dict(lr_max=-0.1), "lr_max must be > 0"),
    (dict(lr_min=0.0), "lr_min must be > 0"),
    (dict(lr_min=0.3), "lr_min 0.3 is above lr_max"),
    (dict(momentum=1.0), "momentum must lie in"),
    (dict(momentum_at_peak=1.0), "momentum_at_peak must lie in"),
    (dict(momentum_at_peak=-0.85), "momentum_at_peak must lie in"),
    (dict(weight_decay=-1e-4), "weight_decay must be >= 0"),
    (dict(device="gpu"), "device must be one of"),
    (dict(cutout_size=40), "larger than the 32-pixel image"),
    (dict(train_subset=100), "batch_size 512 is larger than train_subset 100"),
    (dict(lr_max=float("nan")), "finite"),
    (dict(ema_decay=1.0), "ema_decay must lie in"),
    (dict(ema_every=0), "ema_every must be > 0"),
    (dict(ema_lookahead=True), "ema_lookahead needs a weight average"),
    (dict(eval_batch_size=-1), "eval_batch_size must be > 0, or 0"),
    (dict(compile_mode="fastest"), "compile_mode must be one of"),
    (dict(crop_padding=100_000), "crop_padding must lie in 0..16"),   # would pad 50,000 images to 200,032 px
    (dict(crop_padding=-1), "crop_padding must lie in 0..16"),
    (dict(seed=2**64), "seed must lie in 0..4294967295"),           # beyond what a torch.Generator takes
    (dict(seed=-1), "seed must lie in 0..4294967295"),
])
def test_impossible_values_refused(changes, message):
    with pytest.raises(RecipeError, match=message):
        Recipe(**changes)


def test_the_largest_padding_and_seed_are_accepted():
    recipe = Recipe(crop_padding=16, seed=2**32 - 1)
    assert (recipe.crop_padding, recipe.seed) == (16, 2**32 - 1)


@pytest.mark.parametrize("argv", [
    ["train", "--peak-epoch", "30"],
    ["train", "--batch-size", "0"],
    ["train", "--lr-max", "-1"],
    ["train", "--epochs", "zero"],
    ["train", "--device", "tpu"],
    ["train", "--recipe", "/nonexistent/recipe.toml"],
])
def test_cli_refuses_bad_values_before_any_work(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        code = main([*argv, "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nodata"), "--no-download"])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_cli_bad_recipe_key(tmp_path, capsys):
    p = tmp_path / "r.toml"
    p.write_text("bogus = 1\n")
    assert main(["train", "--recipe", str(p), "--out", str(tmp_path / "run")]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


def test_lr_min_as_a_fraction_of_lr_max():
    r = Recipe(lr_max=0.4, lr_min_div=2000)
    assert r.lr_min == 0.4 / 2000
    assert r.replace(lr_max=0.1).lr_min == 0.1 / 2000  # follows LRMAX, as after --lr-max auto
    assert Recipe().lr_min == 1e-4 and Recipe().lr_min_div == 0
    with pytest.raises(RecipeError, match="lr_min_div must be 0"):
        Recipe(lr_min_div=0.5)


def test_named_recipes():
    seed = load_recipe("seed")
    assert seed == Recipe()  # the shipped seed recipe and the dataclass defaults agree
    dawn = load_recipe("dawnbench")
    assert (dawn.lr_max, dawn.logit_scale, dawn.epochs, dawn.peak_epoch, dawn.batch_size) == (0.4, 0.125, 24, 5, 512)
    assert dawn.lr_min == 0.4 / 1e4 and dawn.nesterov and dawn.weight_decay == 5e-4
    with pytest.raises(RecipeError, match="one of: seed, dawnbench, best"):
        load_recipe("dawnbench2")


def test_best_recipe_keeps_the_seed_frame():
    best, dawn = load_recipe("best"), load_recipe("dawnbench")
    # What the issue fixes: 24 epochs, batch 512, peak at epoch 5, the seed's three transforms.
    assert (best.epochs, best.batch_size, best.peak_epoch) == (24, 512, 5.0)
    assert (best.crop, best.crop_padding, best.flip, best.cutout, best.cutout_size) == (True, 4, True, True, 8)
    assert count_parameters(ResNet9(logit_scale=best.logit_scale, bn_momentum=best.bn_momentum)) == 6_573_130
    # What it changes against dawnbench: label smoothing, the weight average, TTA every epoch.
    changed = {k for k, v in best.to_dict().items() if getattr(dawn, k) != v}
    assert changed == {"label_smoothing", "ema_decay", "tta"}
    assert (best.label_smoothing, best.ema_decay, best.ema_every, best.tta) == (0.2, 0.99, 5, True)


@pytest.mark.parametrize("name", NAMED)
def test_every_named_recipe_says_where_its_values_come_from(name):
    text = (resources.files("cifar_onecycle") / "recipes" / f"{name}.toml").read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) >= 3 and text.startswith("#")


def recipe_of(*argv):
    from cifar_onecycle.cli import build_parser, recipe_from_args

    return recipe_from_args(build_parser().parse_args(["train", *argv]))


def test_a_flag_lr_min_wins_over_the_recipes_lr_min_div():
    r = recipe_of("--recipe", "dawnbench", "--lr-min", "1e-5")
    assert r.lr_min == 1e-5 and r.lr_min_div == 0.0 and r.lr_max == 0.4
    assert "lr_min = 1e-05\n" in r.to_toml() and "lr_min_div = 0.0\n" in r.to_toml()


def test_lr_min_and_lr_min_div_together_are_refused():
    from cifar_onecycle.errors import UserError

    with pytest.raises(UserError, match="--lr-min and --lr-min-div both set LRMIN"):
        recipe_of("--lr-min", "1e-5", "--lr-min-div", "100")


def test_a_file_giving_lr_min_and_lr_min_div_that_disagree_is_refused(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("lr_min = 0.05\nlr_max = 1.0\nlr_min_div = 10.0\n")
    with pytest.raises(RecipeError, match=r"lr_min 0.05 and lr_min_div 10 disagree \(lr_max / lr_min_div is 0.1\)"):
        load_recipe(path)
    # As a run's recipe.toml writes them they agree, and the file reads back as it was written.
    written = load_recipe("dawnbench")
    path.write_text(written.to_toml())
    assert written.lr_min_div > 0 and load_recipe(path) == written
    path.write_text("lr_min = 0.05\nlr_min_div = 0.0\n")  # LRMIN not derived: nothing lost
    assert load_recipe(path).lr_min == 0.05


def test_epochs_alone_keeps_the_recipes_shape():
    assert recipe_of("--epochs", "2").peak_epoch == pytest.approx(5 / 12)    # 5/24 of the run, as the seed
    assert recipe_of("--epochs", "48").peak_epoch == pytest.approx(10.0)
    assert recipe_of("--epochs", "2", "--peak-epoch", "1").peak_epoch == 1.0  # an explicit peak wins
    with pytest.raises(RecipeError, match="peak_epoch 3 must lie in"):
        recipe_of("--epochs", "2", "--peak-epoch", "3")


def test_with_epochs_keeps_the_shape_of_the_cycle():
    short = Recipe().with_epochs(2)
    assert short.epochs == 2 and short.peak_epoch == pytest.approx(5 / 12)  # the seed's 5/24 of the run
    assert Recipe(epochs=48, peak_epoch=10).with_epochs(12).peak_epoch == pytest.approx(2.5)


def test_the_cli_writes_the_settings_an_error_names_as_flags():
    from cifar_onecycle.cli import with_flags
    from cifar_onecycle.errors import UserError, as_setting

    error = UserError(f"{as_setting('out')} /tmp/out: already holds a run; choose another folder or pass "
                      f"{as_setting('overwrite')}")
    assert with_flags(error) == ("--out /tmp/out: already holds a run; choose another folder or pass "
                                 "--overwrite")  # the path's "out" is left alone
    assert str(error) == "out /tmp/out: already holds a run; choose another folder or pass overwrite"
    assert error.settings == ("out", "overwrite")
    assert with_flags(UserError(f"{as_setting('batch_size')} 600 is larger than the 100 training images")) == (
        "--batch-size 600 is larger than the 100 training images")
    assert with_flags(UserError("recipe: epochs must be > 0")) == "recipe: epochs must be > 0"
    # Only what the message marks: the same word elsewhere, even the first, stays a word.
    assert with_flags(UserError(f"out of memory: lower {as_setting('batch_size')}")) == (
        "out of memory: lower --batch-size")


def test_a_recipe_integer_too_large_for_a_float_is_refused(tmp_path):
    (tmp_path / "r.toml").write_text("lr_max = " + "9" * 400 + "\n")
    with pytest.raises(RecipeError, match="lr_max must be a finite number, got an integer of 400 digits"):
        load_recipe(tmp_path / "r.toml")


def test_the_python_functions_take_a_recipe_by_name_or_file_as_the_cli_does(tmp_path):
    assert as_recipe("best") == load_recipe("best") and as_recipe(None) == Recipe()
    (tmp_path / "mine.toml").write_text("epochs = 3\npeak_epoch = 1.0\n")
    assert as_recipe(tmp_path / "mine.toml") == Recipe(epochs=3, peak_epoch=1.0)
    with pytest.raises(TypeError, match="a Recipe, the name of a shipped one"):
        as_recipe(24)
    with pytest.raises(RecipeError, match="no-such-recipe: recipe file not found"):
        train("no-such-recipe", data_dir=tmp_path, download=False)
    planned = sweep(str(tmp_path / "mine.toml"), {"lr_max": [0.1, 0.2]}, out=tmp_path / "sweep", print_commands=True)
    assert load_recipe(tmp_path / "sweep" / "recipe.toml") == Recipe(epochs=3, peak_epoch=1.0)
    assert len(planned.commands) == 2


def test_the_data_the_range_test_and_the_pictures_take_a_recipe_by_name_or_file_too(tmp_path):
    from cifar_onecycle import load_dataset
    from cifar_onecycle.lr_finder import lr_range_test
    from cifar_onecycle.report import plot_augmentation, plot_lr_schedule
    from conftest import write_cifar

    data_dir = write_cifar(tmp_path / "data").parent
    data = load_dataset("quick", data_dir, download=False)
    assert len(data.train_images) == 100 and data.classes == load_dataset(None, data_dir, download=False).classes
    # the LR of each step is the recipe's own: quick peaks at 0.1, the seed at 0.2
    quick = plot_lr_schedule("quick", 156).lines[0].get_ydata()
    assert max(quick) == pytest.approx(0.1) and list(quick) == list(plot_lr_schedule(load_recipe("quick"), 156)
                                                                        .lines[0].get_ydata())
    assert max(plot_lr_schedule(None, 156).lines[0].get_ydata()) == pytest.approx(0.2)
    small = tmp_path / "small.toml"
    small.write_text('epochs = 1\npeak_epoch = 0.5\nbatch_size = 4\ndevice = "cpu"\nprecision = "fp32"\n')
    assert sum(bool(ax.images) for ax in plot_augmentation(small, data.train_images, count=6).axes) == 6
    found = lr_range_test(str(small), data, ("exp",), progress=False, num_iter=10)
    assert len(found["exp"].lrs) == 10


def test_the_help_of_an_auto_lr_names_the_sweep_it_is_read_from(capsys):
    from cifar_onecycle.cli import main
    from cifar_onecycle.lr_finder import AUTO_SWEEPS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone
    words = {"exp": "exponential", "linear": "linear"}  # the sweep the run reads the setting off
    for name in ("lr_max", "lr_min"):
        flag = "--" + name.replace("_", "-")
        line = text.split(f"{flag} LR|auto ", 1)[1].split(" (default:", 1)[0]
        assert f"'auto': the {words[AUTO_SWEEPS[name]]} LR range test's suggestion" in line
