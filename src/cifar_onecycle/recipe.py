"""The recipe: one dataclass that holds every setting of a run. Its defaults are the seed's values.

CLI flags and recipe TOML files are built from its fields, and every run folder gets the resolved
recipe back as recipe.toml, so a run can always be repeated from its own folder.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RecipeError, UserError, as_setting
from .files import MAX_TEXT_BYTES, read_capped
from .schedule import OneCycle, one_cycle_knots

if TYPE_CHECKING:  # torch only for the type: reading a recipe must not import it
    import torch

    from .model import ResNet9

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


# The whole training set is reflect-padded once, through float32: 50,000 x 3 x (32 + 2p)^2 x 4 bytes,
# 2.4 GB at 16. Beyond half the image a crop is mostly mirror image, and reflect padding stops at 31;
# the bound also keeps a recipe file from deciding how much memory the run takes.
MAX_CROP_PADDING = 16
# Upper bounds on the counts a recipe (a file from anyone) sets, so that no file decides how much
# memory or time a run takes before it has done any work. 10,000 epochs are weeks of a GPU; a batch
# of 65,536 images holds 805 MB of fp32 inputs before any activation (all 50,000 CIFAR-10 training
# images fit in one).
MAX_EPOCHS = 10_000
MAX_BATCH = 1 << 16
# Test-time translations beyond a few pixels show mostly mirrored border (airbench shifts by 1).
MAX_TTA_TRANSLATE = 4
# Seeds lie in 0 .. SEEDS_END - 1: what a recipe, a run folder and seeds.json accept. The run's one
# generator takes the seed itself (a torch.Generator would take up to 2**64 - 1); 32 bits keep a
# seed a plain number in every file and tool that reads one.
SEEDS_END = 2**32
DATASETS = ("cifar10", "cifar100", "folder")
# CIFAR-10's per-channel statistics, the seed's normalisation; other data sets' are computed from
# their training images when a run starts, and recorded in the recipe.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel, 0..1
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100's fine labels in label order (its meta file's fine_label_names, alphabetical).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)
# The settings a run fills in from its data when the recipe leaves them None (datasets.fit_recipe).
DATA_FIELDS = ("classes", "mean", "std")
# A classifier's head grows with its classes (513 parameters each); 10,000 is far beyond CIFAR-100
# and ImageNet's 1,000, and keeps a recipe file from deciding the model's size.
MAX_CLASSES = 10_000
MAX_CLASS_NAME = 255  # a folder name's limit on Linux


def _opt(default: Any, help: str, flag: bool = True, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass(frozen=True)
class Recipe:
    """Everything that decides what a training run computes. Defaults: the EVA6 Session 9 seed."""

    # One Cycle policy (seed: 24 epochs, LRMIN 1e-4 -> LRMAX 0.2 at epoch 5 -> LRMIN at 24, no annihilation)
    epochs: int = _opt(24, "number of epochs")
    batch_size: int = _opt(512, "global batch size")
    lr_min: float = _opt(1e-4, "LRMIN: the LR at the first and the last step")
    lr_max: float = _opt(0.2, "LRMAX: the LR at the end of the peak epoch")
    lr_min_div: float = _opt(0.0, "if > 0, LRMIN is LRMAX divided by this (kept when --lr-max auto finds LRMAX)")
    peak_epoch: float = _opt(5.0, "epoch at whose end the LR peaks (may be fractional)")
    # SGD. The seed does not state its weight decay; 5e-4 on the mean loss is the common value for
    # this network (cifar10-fast's 5e-4 x batch 512 on a summed loss is the same thing).
    momentum: float = _opt(0.9, "SGD momentum (with momentum_at_peak: at the first and the last step)")
    momentum_at_peak: float = _opt(0.0, "cyclical momentum: the momentum at the LR's peak, in straight lines from "
                                        "momentum at the first and the last step, as Smith's One Cycle (0.85 with "
                                        "momentum 0.95, fastai's default; 0: momentum throughout)")
    nesterov: bool = _opt(True, "Nesterov momentum")
    weight_decay: float = _opt(5e-4, "L2 weight decay (SGD's, on every parameter)")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    ema_decay: float = _opt(0.0, "per-step decay of an average of the weights that is evaluated and saved "
                                 "in their place (0: off)")
    ema_every: int = _opt(5, "update the weight average every this many steps")
    ema_bn_batches: int = _opt(0, "with a weight average: its BatchNorm statistics recomputed at the end over this "
                                  "many training batches (0: the average of the trained model's statistics)")
    ema_lookahead: bool = _opt(False, "with a weight average: lookahead (hlb-CIFAR10, airbench): each update also sets "
                                      "the trained weights to the average, whose rate ramps up from 0 as the cube of "
                                      "the run's progress to ema_decay at its end")
    # Model
    logit_scale: float = _opt(1.0, "multiplier on the logits (DAWNBench uses 0.125); adds no parameters")
    bn_momentum: float = _opt(0.1, "BatchNorm running-statistics momentum (PyTorch convention)")
    bn_ghost_batch: int = _opt(0, "BatchNorm statistics in training over groups of this many images of each batch "
                                  "(ghost batch norm; 0: the whole batch)")
    bn_scale_frozen: bool = _opt(False, "BatchNorm scales stay at 1 (never updated)")
    bn_bias_lr_mult: float = _opt(1.0, "the BatchNorm biases' LR is the schedule's times this")
    sync_bn: bool = _opt(False, "under torchrun: SyncBatchNorm (statistics over the global batch; CUDA only)")
    # Augmentation, in the seed's order
    crop: bool = _opt(True, "RandomCrop 32 after reflect-padding by crop_padding")
    crop_padding: int = _opt(4, "reflect padding on each side before the random crop (0 to 16)")
    flip: bool = _opt(True, "random horizontal flip with p = 0.5")
    flip_alternate: bool = _opt(False, "with flip: each image mirrored in every other epoch (at random in the first) "
                                       "instead of by a new coin each epoch")
    cutout: bool = _opt(True, "CutOut: one square hole filled with the dataset mean")
    cutout_size: int = _opt(8, "side of the CutOut hole, in pixels")
    # Data: the source, and what the run learns of it (filled in from the data when a run starts,
    # and recorded: evaluate, report and predict then need no data to name the classes).
    dataset: str = _opt("cifar10", "the images: CIFAR-10, CIFAR-100 (its 100 fine classes) or a folder of "
                                   "train/<class>/ and test/<class>/ images", choices=DATASETS)
    skip_bad_images: bool = _opt(False, "with dataset folder: leave out an image that cannot be read (counted in "
                                        "summary.json) instead of stopping at it")
    classes: tuple[str, ...] | None = _opt(None, "the classes' names, in label order (none: the data's)", flag=False)
    mean: tuple[float, float, float] | None = _opt(None, "per-channel mean of the training images, RGB, 0..1 (none: "
                                                         "CIFAR-10's constants, or computed from the data)", flag=False)
    std: tuple[float, float, float] | None = _opt(None, "per-channel standard deviation of the training images, "
                                                        "RGB, 0..1 (none: as mean)", flag=False)
    # Run
    seed: int = _opt(0, "seed of the weights, the data order and the augmentation")
    train_subset: int = _opt(0, "train on the first N training images only (0: all; after the holdout is taken out)")
    holdout: int = _opt(0, "validation split: N training images (stratified by class, the same for every seed) left "
                           "out of training and evaluated each epoch instead of the test set, which is evaluated "
                           "once at the end (0: none)")
    device: str = _opt("auto", "training device (auto: CUDA when there is one, else the CPU)",
                      choices=("auto", "cpu", "cuda"))
    precision: str = _opt("auto", "autocast's arithmetic (bf16, fp16: convolutions and the linear layer; weights "
                         "stay fp32); auto: bf16 on GPUs that have it, fp16 on older ones, bf16 on CPUs "
                         "that run it natively, else fp32",
                         choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = _opt(True, "channels_last memory format (faster convolutions on CPU and GPU)")
    compile: bool = _opt(False, "torch.compile the model")
    compile_mode: str = _opt("default", "torch.compile mode, with compile (reduce-overhead: CUDA graphs)",
                             choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    eval_batch_size: int = _opt(0, "batch size for evaluation (0: the device's: 64 on a CPU, where small "
                                       "batches are faster, 1000 on a GPU)")
    tta: bool = _opt(False, "also report test accuracy with test-time augmentation after every epoch")
    tta_translate: int = _opt(0, "test-time augmentation averages the mirror and also the image shifted this many "
                                 "pixels up-left and down-right, each with its mirror (0: the mirror only)")

    def __post_init__(self) -> None:
        if isinstance(self.lr_min_div, (int, float)) and self.lr_min_div > 0 and isinstance(self.lr_max, (int, float)):
            object.__setattr__(self, "lr_min", self.lr_max / self.lr_min_div)  # frozen: set once, here
        self.validate()

    def validate(self) -> None:
        """Refuse impossible values with a one-line message that names the setting."""
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in DATA_FIELDS:
                self._validate_data_field(f.name, v)
                continue
            want = _PYTHON_TYPES[_type_name(f)]
            if isinstance(v, bool) and want is not bool or not isinstance(v, want):
                raise RecipeError(f"recipe: {f.name} must be {_type_name(f)}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise RecipeError(f"recipe: {f.name} must be a finite number, got {v!r}")
            choices = f.metadata.get("choices")
            if choices and v not in choices:
                raise RecipeError(f"recipe: {f.name} must be one of {', '.join(choices)}, got {v!r}")
        for name in ("epochs", "batch_size", "cutout_size", "ema_every"):
            if getattr(self, name) <= 0:
                raise RecipeError(f"recipe: {name} must be > 0, got {getattr(self, name)}")
        if self.eval_batch_size < 0:
            raise RecipeError(f"recipe: eval_batch_size must be > 0, or 0 (the device's), got {self.eval_batch_size}")
        for name, bound in (("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH), ("eval_batch_size", MAX_BATCH),
                            ("ema_every", MAX_EPOCHS * MAX_BATCH), ("ema_bn_batches", MAX_BATCH)):
            if getattr(self, name) > bound:
                raise RecipeError(f"recipe: {name} must be at most {bound:,}, got {short_number(getattr(self, name))}")
        for name in ("lr_min", "lr_max"):
            if getattr(self, name) <= 0:
                raise RecipeError(f"recipe: {name} must be > 0, got {getattr(self, name)}")
        if self.lr_min_div != 0 and self.lr_min_div < 1:
            raise RecipeError(f"recipe: lr_min_div must be 0 (off) or >= 1, got {self.lr_min_div}")
        if self.lr_min > self.lr_max:
            raise RecipeError(f"recipe: lr_min {self.lr_min} is above lr_max {self.lr_max}")
        if not 0 < self.peak_epoch <= self.epochs:
            raise RecipeError(
                f"recipe: peak_epoch {self.peak_epoch:g} must lie in (0, epochs={self.epochs}]; for a short "
                f"run set a smaller peak_epoch (the seed's is 5/24 of the run; with_epochs keeps that shape)")
        if not 0 <= self.momentum < 1:
            raise RecipeError(f"recipe: momentum must lie in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise RecipeError("recipe: nesterov needs momentum > 0")
        if not 0 <= self.momentum_at_peak < 1:
            raise RecipeError(f"recipe: momentum_at_peak must lie in [0, 1) (0: no cycle), got {self.momentum_at_peak}")
        if self.weight_decay < 0:
            raise RecipeError(f"recipe: weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise RecipeError(f"recipe: label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.ema_decay < 1:
            raise RecipeError(f"recipe: ema_decay must lie in [0, 1) (0: off), got {self.ema_decay}")
        if not 0 < self.bn_momentum <= 1:
            raise RecipeError(f"recipe: bn_momentum must lie in (0, 1], got {self.bn_momentum}")
        if self.ema_bn_batches < 0:
            raise RecipeError(f"recipe: ema_bn_batches must be >= 0 (0: off), got {self.ema_bn_batches}")
        if self.ema_lookahead and not self.ema_decay:
            raise RecipeError("recipe: ema_lookahead needs a weight average to look ahead with; set ema_decay "
                              "(airbench's is 0.95)")
        if self.bn_ghost_batch < 0:
            raise RecipeError(f"recipe: bn_ghost_batch must be >= 0 (0: off), got {self.bn_ghost_batch}")
        if self.bn_ghost_batch and self.batch_size % self.bn_ghost_batch:
            raise RecipeError(f"recipe: bn_ghost_batch {self.bn_ghost_batch} must divide batch_size "
                              f"{self.batch_size}")
        if self.bn_bias_lr_mult < 0:
            raise RecipeError(f"recipe: bn_bias_lr_mult must be >= 0, got {self.bn_bias_lr_mult}")
        if not 0 <= self.tta_translate <= MAX_TTA_TRANSLATE:
            raise RecipeError(f"recipe: tta_translate must lie in 0..{MAX_TTA_TRANSLATE}, got {self.tta_translate}")
        if self.logit_scale <= 0:
            raise RecipeError(f"recipe: logit_scale must be > 0, got {self.logit_scale}")
        if not 0 <= self.crop_padding <= MAX_CROP_PADDING:
            raise RecipeError(f"recipe: crop_padding must lie in 0..{MAX_CROP_PADDING} (the seed's is 4), got "
                              f"{self.crop_padding}")
        if not 0 <= self.seed < SEEDS_END:
            raise RecipeError(f"recipe: seed must lie in 0..{SEEDS_END - 1}, got {self.seed}")
        if self.cutout_size > 32:
            raise RecipeError(f"recipe: cutout_size {self.cutout_size} is larger than the 32-pixel image")
        if self.holdout < 0:
            raise RecipeError(f"recipe: holdout must be >= 0 (0: none), got {self.holdout}")
        if self.train_subset < 0:
            raise RecipeError(f"recipe: train_subset must be >= 0 (0: all), got {self.train_subset}")
        if self.train_subset and self.batch_size > self.train_subset:
            raise RecipeError(f"recipe: batch_size {self.batch_size} is larger than train_subset "
                              f"{self.train_subset}; use a smaller batch_size")

    @staticmethod
    def _validate_data_field(name: str, value: Any) -> None:
        """classes: None or 2..MAX_CLASSES distinct non-empty names; mean, std: None or 3 finite
        numbers (std's above 0)."""
        if value is None:
            return
        if name == "classes":
            if not isinstance(value, tuple) or not 2 <= len(value) <= MAX_CLASSES or len(set(value)) != len(value) \
                    or not all(isinstance(c, str) and 0 < len(c) <= MAX_CLASS_NAME for c in value):
                raise RecipeError(f"recipe: classes must be 2 to {MAX_CLASSES:,} different names of 1 to "
                                  f"{MAX_CLASS_NAME} characters, got {short_number(value)}")
        elif not isinstance(value, tuple) or len(value) != 3 or not all(
                type(x) in (int, float) and math.isfinite(x) and (x > 0 if name == "std" else True) for x in value):
            positive = ", each > 0" if name == "std" else ""
            raise RecipeError(f"recipe: {name} must be 3 finite numbers (R, G, B){positive}, got {short_number(value)}")

    @property
    def num_classes(self) -> int:
        """The model's outputs: one a class (``class_names``)."""
        return len(self.class_names)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes' names in label order: the recorded ones, else the source's."""
        if self.classes is not None:
            return self.classes
        if self.dataset == "cifar10":
            return CIFAR10_CLASSES
        if self.dataset == "cifar100":
            return CIFAR100_CLASSES
        raise RecipeError("recipe: a folder's classes are not recorded in this recipe; train on the folder first")

    @property
    def normalization(self) -> Normalization:
        """(mean, std) per channel, 0..1, that inputs are standardised with: the recorded ones, else
        CIFAR-10's constants for CIFAR-10."""
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        if self.dataset == "cifar10":
            return CIFAR10_MEAN, CIFAR10_STD
        raise RecipeError(f"recipe: the {self.dataset} data's mean and std are not recorded in this recipe; they are "
                          f"computed when a run starts")

    @property
    def trained_ends_as_average(self) -> bool:
        """Whether the trained weights end the run as the weight average: lookahead's last update
        writes the average back, unless ``ema_bn_batches`` then recomputes its statistics."""
        return self.ema_lookahead and not self.ema_bn_batches

    @property
    def padding(self) -> int:
        """Pixels of reflect padding around each training image: the crop's, none without a crop."""
        return self.crop_padding if self.crop else 0

    @property
    def hole_size(self) -> int:
        """Side of the CutOut hole; 0 without CutOut."""
        return self.cutout_size if self.cutout else 0

    @property
    def memory_format(self) -> torch.memory_format:
        import torch

        return torch.channels_last if self.channels_last else torch.contiguous_format

    def model(self) -> ResNet9:
        """A new ResNet of the seed with this recipe's logit scale and BatchNorm momentum and ghost
        batches (weights from torch's global generator)."""
        from .model import ResNet9

        return ResNet9(num_classes=self.num_classes, logit_scale=self.logit_scale, bn_momentum=self.bn_momentum,
                       ghost_batch=self.bn_ghost_batch)

    def one_cycle(self, steps_per_epoch: int) -> OneCycle:
        """The schedule of a run of ``steps_per_epoch`` steps an epoch: its LR, and its momentum when
        ``momentum_at_peak`` makes it cycle."""
        def knots(start: float, peak: float) -> list[tuple[int, float]]:
            return one_cycle_knots(self.epochs, steps_per_epoch, self.peak_epoch, start, peak)

        return OneCycle(knots(self.lr_min, self.lr_max),
                        knots(self.momentum, self.momentum_at_peak) if self.momentum_at_peak else None)

    def with_epochs(self, epochs: int) -> Recipe:
        """The same One Cycle shape over ``epochs``: the peak moves to the same fraction of the run."""
        if not 0 < epochs <= MAX_EPOCHS:  # before the arithmetic: a huge integer would overflow a float
            raise RecipeError(f"recipe: epochs must lie in 1..{MAX_EPOCHS:,}, got {short_number(epochs)}")
        return self.replace(epochs=epochs, peak_epoch=self.peak_epoch * epochs / self.epochs)

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def choices(name: str) -> tuple[str, ...]:
        """The values a setting with a fixed set of them (device, precision, compile_mode) takes."""
        return next(f.metadata["choices"] for f in fields(Recipe) if f.name == name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "recipe") -> Recipe:
        """Build from a mapping, refusing unknown keys (a typo must not silently fall back to a default)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise RecipeError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
        coerced: dict[str, Any] = {}
        for k, v in values.items():
            try:
                if k in DATA_FIELDS and isinstance(v, list):  # TOML and JSON arrays
                    coerced[k] = tuple(float(x) if k != "classes" and type(x) is int else x for x in v)
                    continue
                coerced[k] = float(v) if _type_name(known[k]) == "float" and type(v) is int else v
            except OverflowError:  # TOML integers have no size limit; a float has
                raise RecipeError(f"{source}: {k} must be a finite number, got {short_number(v)}") from None
        return cls(**coerced)

    def to_toml(self) -> str:
        """The recipe as TOML, one key a line, readable by ``load_recipe`` (a setting left to the
        data, None, is left out: TOML has no null)."""
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.to_dict().items() if v is not None)


def check_seed_range(first: int, count: int) -> None:
    """Seeds ``first`` .. ``first + count - 1`` must each be a seed a recipe takes."""
    if count < 1:
        raise UserError(f"{as_setting('seeds')} {count}: give at least 1")
    if first + count > SEEDS_END:
        raise UserError(f"{as_setting('seeds')} {count} from {as_setting('seed')} {first} would end at seed "
                        f"{first + count - 1}, beyond the "
                        f"largest, {SEEDS_END - 1}")


def short_number(value: Any) -> str:
    """A value for a message: a long integer by its number of digits (counted where Python will
    write it out, estimated beyond 4,300 digits, where str() raises), anything else cut at 40
    characters."""
    if isinstance(value, int) and abs(value) >= 10**30:
        try:
            return f"an integer of {len(str(abs(value)))} digits"
        except ValueError:
            return f"an integer of about {int((abs(value).bit_length() - 1) * math.log10(2)) + 1} digits"
    text = str(value)
    return text if len(text) <= 40 else text[:40] + "..."


_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):  # a TOML basic string: quote, backslash and control characters escaped
        return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c
                             for c in v) + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


NAMED = ("seed", "dawnbench", "best", "quick")


def load_recipe(path: str | Path, base: Recipe | None = None) -> Recipe:
    """Read a recipe TOML file over ``base`` (default: the seed's recipe). ``path`` may also be the
    name of a recipe shipped with the package: ``seed``, ``dawnbench``, ``best`` or ``quick``."""
    if str(path) in NAMED and not Path(path).exists():
        text = (resources.files(__package__) / "recipes" / f"{path}.toml").read_text(encoding="utf-8")
        return _over(base, tomllib.loads(text), f"recipe {path}")
    path = Path(path)
    try:
        if path.is_dir() and (path / "recipe.toml").is_file():  # a run's folder for its recipe.toml
            raise RecipeError(f"{path}: a run's folder, not a recipe file; give its recipe: {path / 'recipe.toml'}")
        text = read_capped(path, MAX_TEXT_BYTES, "recipe file", "give a recipe TOML file").decode()
        check_flat(text, str(path))
        values = tomllib.loads(text)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found; give a TOML file or one of: {', '.join(NAMED)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe file ({getattr(e, 'strerror', None) or e})") from None
    except RecipeError:
        raise
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: a number Python will not convert
        raise RecipeError(f"{path}: not valid TOML ({str(e)[:200]})") from None
    return _over(base, values, str(path))


def as_recipe(recipe: Recipe | str | os.PathLike[str] | None) -> Recipe:
    """A Python function's ``recipe`` argument as a Recipe: None is the seed's; a string or a path is
    a shipped recipe's name (``"best"``) or a TOML file, read by ``load_recipe`` as ``--recipe`` is."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(os.fspath(recipe))
    raise TypeError(f"recipe: a Recipe, the name of a shipped one ({', '.join(NAMED)}) or a TOML file's path; "
                    f"got {type(recipe).__name__}")


# A recipe is flat: one bare key and one value a line, and comments. Checked before the TOML parser
# sees the text, whose work grows with the square of a dotted key's length (a 200 KB key of 100,000
# parts took over 8 GB) and with nesting; a recipe has 50 settings, a line of it 100 bytes. The one
# structure allowed is a flat array of strings or numbers (the classes' names, a mean); its line may
# be as long as the file. It is matched in linear time and constant memory without the possessive
# quantifiers Python 3.10 lacks (16 MB: under 0.7 s and 4 MB on 3.10 and 3.11, measured). re keeps a
# record for each repeat of a group (3.5 GB for a 16 MB line), so items are matched a hundred at a time
# and a string's escapes are bounded by a class name's length; and re steps back through a run of
# characters one at a time when what follows fails (8 s for a 16 MB string), so a run is taken whole,
# by a lookahead (atomic in re) and a backreference to what it captured.
_KEY = r"[ \t]*[A-Za-z_][A-Za-z0-9_]{0,63}[ \t]*=[ \t]*"
_RUN = r'(?=(?P<{0}>[^"\\\n]*))(?P={0})'
_ITEM = (rf'(?:"{_RUN.format("run")}(?:\\.{_RUN.format("escaped_run")}){{0,{MAX_CLASS_NAME}}}"'
         r"|[-+]?[0-9][0-9_.eE+-]{0,39})")
_ARRAY_START = re.compile(rf"{_KEY}\[[ \t]*")
_ARRAY_ITEMS = re.compile(rf"(?:{_ITEM}[ \t]*,[ \t]*){{1,100}}")
_ARRAY_END = re.compile(rf"(?:{_ITEM}[ \t]*)?\][ \t]*(#.*)?")
_RECIPE_LINE = re.compile(rf"[ \t]*(#.*)?|{_KEY}[^\s\[{{].*")
MAX_RECIPE_LINES, MAX_RECIPE_LINE = 1_000, 1_000


def _flat_array(line: str) -> bool:
    """Whether ``line`` is ``key = [item, ...]`` of strings and numbers. Linear in the line's length
    with constant memory: an item ends at its comma, so each group of items has one way to match."""
    start = _ARRAY_START.match(line)
    if start is None:
        return False
    position = start.end()
    while (items := _ARRAY_ITEMS.match(line, position)) is not None:
        position = items.end()
    return _ARRAY_END.fullmatch(line, position) is not None


def check_flat(text: str, source: str) -> None:
    """Refuse a recipe file that is not flat ``key = value`` lines (and comments), before parsing."""
    lines = text.splitlines()
    if len(lines) > MAX_RECIPE_LINES:
        raise RecipeError(f"{source}: {len(lines):,} lines; a recipe holds one setting a line (at most "
                          f"{MAX_RECIPE_LINES:,})")
    for number, line in enumerate(lines, 1):
        if not (len(line) <= MAX_RECIPE_LINE and _RECIPE_LINE.fullmatch(line) or _flat_array(line)):
            raise RecipeError(f"{source}: not valid TOML for a recipe: line {number} is not 'setting = value' (a "
                              f"recipe has no tables, dotted keys, nested arrays or other lines over "
                              f"{MAX_RECIPE_LINE} characters)")


def _over(base: Recipe | None, values: dict[str, Any], source: str) -> Recipe:
    """A recipe file's ``values`` over ``base``. A file may give lr_min and lr_min_div together only
    as recipe.toml writes them, agreeing (lr_min = lr_max / lr_min_div): otherwise one would be lost.
    An impossible value is named with its file: a run folder's recipe.toml may be someone else's."""
    try:
        recipe = Recipe.from_dict({**(base or Recipe()).to_dict(), **values}, source=source)
    except RecipeError as e:
        raise RecipeError(f"{source}: {str(e).removeprefix(f'{source}: ').removeprefix('recipe: ')}") from None
    given = values.get("lr_min")
    if "lr_min_div" in values and recipe.lr_min_div > 0 and given is not None and given != recipe.lr_min:
        raise RecipeError(f"{source}: lr_min {given!r} and lr_min_div {recipe.lr_min_div:g} disagree (lr_max / "
                          f"lr_min_div is {recipe.lr_min:g}); give one of them")
    return recipe
