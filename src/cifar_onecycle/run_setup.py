"""What a run trains with, on its device: data, model, optimizer, loss scaler, weight average and
random generators, all built from the recipe and its seed."""
from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F

from .augment import DRAW_COLUMNS, draw_augmentation, epoch_batches, pad_reflect
from .data import LabelledImages
from .datasets import fit_recipe
from .device import augment_at_once, autocast, conv_by_matmul_pays, resolve_placement
from .distributed import Dist, check_batch
from .ema import WeightEMA, refresh_batchnorm
from .errors import UserError, as_setting
from .evaluation import Scores, evaluate_recipe
from .holdout import holdout_split
from .model import training_flops_per_image
from .recipe import SEEDS_END, Recipe
from .step import make_optimizer, make_scaler, train_step


@dataclass
class RunSetup:
    """Everything a run trains with, on its device."""

    recipe: Recipe
    data: LabelledImages                # as given, on the CPU
    device: torch.device
    precision: str
    train_images: torch.Tensor   # uint8, already padded for the crop
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    model: torch.nn.Module
    step_model: torch.nn.Module  # the model, or its DDP / torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightEMA | None           # the weight average, when the recipe keeps one
    generator: torch.Generator   # each epoch's order and augmentation draws: the same on every rank
    dist: Dist = field(default_factory=Dist)
    val_images: torch.Tensor | None = None  # the held-out training images (recipe.holdout), else None
    val_labels: torch.Tensor | None = None
    augment_images: int | None = None       # images a GPU augments at once (None: the device's policy)

    @property
    def epoch_split(self) -> str:
        """What each epoch is evaluated on: "val" (the held-out images) with a holdout, else "test"."""
        return "test" if self.val_images is None else "val"

    @functools.cached_property
    def flops_per_image(self) -> float:
        """The training FLOPs one image costs (``model.training_flops_per_image``; counted once)."""
        return training_flops_per_image(self.model)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_images) // self.recipe.batch_size

    @property
    def delivered_model(self) -> torch.nn.Module:
        """The model a run saves and its test accuracies describe: the weight average when the
        recipe keeps one, else the trained model."""
        return self.ema.model if self.ema else self.model

    def refresh_average_statistics(self) -> None:
        """With a weight average and ``ema_bn_batches``: its BatchNorm statistics recomputed over that
        many augmented training batches (``ema.refresh_batchnorm``), in the run's precision. The
        batches come from a generator of their own, so the run's stream is as without it and a
        resumed run that recomputes them gets the same."""
        if not (self.ema and self.recipe.ema_bn_batches):
            return
        generator = torch.Generator(device=self.device).manual_seed(self.recipe.seed + SEEDS_END + 1)
        order = torch.randperm(len(self.train_images), device=self.device, generator=generator)
        draws = draw_augmentation(len(order), generator=generator, **self.augmentation_shape)
        with self.autocast():
            refresh_batchnorm(self.ema.model, itertools.islice(self.epoch(order, draws), self.recipe.ema_bn_batches))

    def shuffle(self) -> torch.Tensor:
        """A new epoch's order of the training images."""
        return torch.randperm(len(self.train_images), device=self.device, generator=self.generator)

    @property
    def augmentation_shape(self) -> dict[str, int]:
        """What an augmentation draw depends on: the image's side, the crop's padding, the hole's side."""
        padding = self.recipe.padding
        return {"size": self.train_images.shape[-1] - 2 * padding, "padding": padding,
                "cutout_size": self.recipe.hole_size}

    def draw_augmentation(self, order: torch.Tensor, epoch: int = 1) -> torch.Tensor:
        """Epoch ``epoch``'s augmentation draws, one row per position of its ``order``
        (``augment.draw_augmentation``). Drawn whole on every rank, like the order: each rank uses
        the rows of its own share. With ``flip_alternate`` the flip column is each image's own
        coin (``first_flips``) in odd epochs and its opposite in even ones."""
        draws = draw_augmentation(len(self.train_images), generator=self.generator, **self.augmentation_shape)
        if self.recipe.flip_alternate:
            draws[:, DRAW_COLUMNS.index("flip")] = self.first_flips[order] ^ ((epoch - 1) % 2)
        return draws

    @functools.cached_property
    def first_flips(self) -> torch.Tensor:
        """Each training image's flip in the first epoch, for ``flip_alternate``: a coin per image from
        a generator of its own (the recipe's seed moved past every seed's range, so that it is not
        the stream that draws the orders), so a resumed run draws the same."""
        generator = torch.Generator().manual_seed(self.recipe.seed + SEEDS_END)
        return torch.randint(0, 2, (len(self.train_images),), generator=generator).to(self.device)

    def epoch(self, order: torch.Tensor | None = None, draws: torch.Tensor | None = None,
              start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Augmented training batches in ``order`` with its ``draws`` (new ones when None), from batch ``start``."""
        recipe = self.recipe
        order = self.shuffle() if order is None else order
        draws = self.draw_augmentation(order) if draws is None else draws
        return epoch_batches(self.train_images, self.train_labels, recipe.batch_size, crop=recipe.crop,
                             padding=recipe.padding, flip=recipe.flip, cutout_size=recipe.hole_size, order=order,
                             draws=draws, start=start, rank=self.dist.rank, world=self.dist.world,
                             memory_format=recipe.memory_format,
                             batches_at_once=augment_at_once(self.device, recipe.batch_size, self.augment_images),
                             normalization=recipe.normalization)

    def autocast(self) -> torch.autocast:
        return autocast(self.device, self.precision)

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return partial(F.cross_entropy, label_smoothing=self.recipe.label_smoothing)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float,
             momentum: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of this run (``train_step`` with its model, optimizer, scaler, precision and loss)."""
        return train_step(self.step_model, self.optimizer, inputs, targets, lr, momentum=momentum, scaler=self.scaler,
                          autocast=self.autocast, loss_fn=self.loss_fn)

    def evaluate(self, average: bool = True, tta: bool = False, stop: Callable[[], bool] | None = None,
                 split: str | None = None, keep_probabilities: bool = False) -> Scores:
        """Loss and accuracy (with ``tta``, also with TTA) of the delivered model (of the trained
        weights alone with ``average`` false) on ``split``, "val" or "test" (default: ``epoch_split``),
        and with ``keep_probabilities`` (a single process only) each image's probabilities;
        ``EvaluationStopped`` when ``stop()`` cuts the pass short."""
        images, labels = self.split(split or self.epoch_split)
        return evaluate_recipe(self.evaluated_model(average), images, labels, self.recipe, self.precision,
                               dist=self.dist, tta=tta, stop=stop, keep_probabilities=keep_probabilities)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of the split ``name``, "val" or "test", on the device."""
        images, labels = (self.val_images, self.val_labels) if name == "val" else (self.test_images, self.test_labels)
        if images is None or labels is None:
            raise ValueError("no validation split: the recipe's holdout is 0")
        return images, labels

    def evaluated_model(self, average: bool = True) -> torch.nn.Module:
        """The model an evaluation runs: the weight average (unless ``average`` is false) when the
        recipe keeps one, else the trained model, compiled when the run is."""
        if self.ema and average:
            return self.ema.model
        # DDP's forward would add collectives: under torchrun, the bare model
        return self.step_model if self.dist.world == 1 else self.model


def training_split(recipe: Recipe, data: LabelledImages) -> tuple[torch.Tensor | slice, torch.Tensor | None]:
    """(the training images the recipe trains on, the held-out ones or None) as indices into the
    data's training set; refuse a holdout, subset or batch the data cannot give."""
    held: torch.Tensor | None = None
    kept: torch.Tensor | slice = slice(None)
    available = len(data.train_images)
    if recipe.holdout:
        kept, held = holdout_split(data.train_labels, recipe.holdout, len(data.classes))
        available = len(kept)
    n_train = recipe.train_subset or available
    holdout = f"{as_setting('holdout')} {recipe.holdout}"
    if n_train > available:
        raise UserError(f"{as_setting('train_subset')} {n_train}: only {available} training images"
                        + (f" once {holdout} is taken out" if recipe.holdout else ""))
    if recipe.batch_size > n_train:
        raise UserError(f"{as_setting('batch_size')} {recipe.batch_size} is larger than the {n_train} training images"
                        + (f" left by {holdout}" if recipe.holdout and not recipe.train_subset else "")
                        + "; use a smaller one")
    return kept[:n_train] if isinstance(kept, torch.Tensor) else slice(n_train), held


def split_images(recipe: Recipe, data: LabelledImages, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels a run of ``recipe`` on ``data`` evaluates as ``split``: "val", those it
    holds out of training (they depend on the training labels alone), or "test"."""
    if split == "test":
        return data.test_images, data.test_labels
    _, held = training_split(recipe, data)
    if held is None:
        raise ValueError("no validation split: the recipe's holdout is 0")
    return data.train_images[held], data.train_labels[held]


def fit_to_data(recipe: Recipe, data: LabelledImages) -> Recipe:
    """``recipe`` with the data settings a run of it on ``data`` records (``fit_recipe``), after
    checking that the data can give its split. Runs that share a split (the seeds of a set, the
    points of a sweep) take them from here once: a source other than CIFAR-10 costs a pass over the
    training images for its channel statistics (1 to 2 s for 50,000 on 2 CPU cores)."""
    kept, _ = training_split(recipe, data)
    return fit_recipe(recipe, data, data.train_images[kept])


def setup_run(recipe: Recipe, data: LabelledImages, dist: Dist | None = None,
              augment_images: int | None = None) -> RunSetup:
    """Check that the recipe can run here on this data, move the data to the device and build the
    model, optimizer and generators, seeded from the recipe. ``augment_images``: how many images a
    GPU augments at once (``device.augment_at_once``; the batches are the same whatever it is).

    Under torchrun (``dist.world > 1``) the model is wrapped in DistributedDataParallel; every rank
    starts from the same weights (same seed, and DDP broadcasts rank 0's at wrapping).
    """
    dist = dist or Dist()
    device, precision = resolve_placement(recipe)
    kept, held = training_split(recipe, data)
    kept_images = data.train_images[kept]  # with a holdout a copy (138 MB for 45,000 images), else a view
    recipe = fit_recipe(recipe, data, kept_images)  # the data's classes and statistics, recorded
    check_batch(recipe.batch_size, dist)
    if recipe.sync_bn and dist.world > 1 and device.type != "cuda":
        raise UserError(f"{as_setting('sync_bn')} needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); leave it "
                        f"off on the CPU")
    # The whole uint8 data set lives on the device (150 MB for CIFAR-10): no loader, no workers.
    # Padding once here, not per batch, leaves each step a single gather for its crops.
    train_images = pad_reflect(kept_images.to(device), recipe.padding)
    torch.manual_seed(recipe.seed)  # the weights' initialisation
    network = recipe.model()
    network.set_conv_by_matmul(conv_by_matmul_pays(device, precision))
    model: torch.nn.Module = network
    if recipe.sync_bn and dist.world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # torch's stubs leave out Module.to's memory_format, which it takes at run time
    model = model.to(device, memory_format=recipe.memory_format)  # type: ignore[call-overload]
    # cuDNN's benchmark mode is left off: on an H200 its choices were slower than its heuristics
    # (benchmarks/results/README.md, the defaults).
    optimizer = make_optimizer(model, recipe, device)
    step_model = model
    if dist.world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    if recipe.compile:
        step_model = cast(torch.nn.Module, torch.compile(step_model, mode=recipe.compile_mode))  # a module wrapper
    ema = WeightEMA(model, recipe.ema_decay, recipe.ema_every, recipe.ema_lookahead) if recipe.ema_decay else None
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    return RunSetup(recipe, data, device, precision, train_images, data.train_labels[kept].to(device),
                    data.test_images.to(device), data.test_labels.to(device), model, step_model, optimizer,
                    make_scaler(device, precision), ema, generator, dist,
                    None if held is None else data.train_images[held].to(device),
                    None if held is None else data.train_labels[held].to(device), augment_images)
