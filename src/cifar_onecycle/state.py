"""Where a run is, and the checkpoint that holds it: ``TrainState`` becomes checkpoint.pt through
``to_checkpoint`` and comes back from it through ``from_checkpoint``, nowhere else."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .augment import draws_problem
from .errors import UserError, as_setting
from .evaluation import Scores
from .files import check_plain
from .recipe import short_number
from .results import EpochMetrics, history_from_rows
from .run_setup import RunSetup


@dataclass
class TrainState:
    """The position in the run, the epoch's running sums and the history: with the model,
    optimizer, loss scaler, weight average and random states (which live in ``RunSetup``), all a
    run needs to continue bit for bit."""

    epoch: int = 0                      # epochs finished
    batch: int = 0                      # the next batch of epoch ``epoch + 1`` (steps_per_epoch: evaluation pending)
    order: torch.Tensor | None = None   # that epoch's shuffle, once drawn
    draws: torch.Tensor | None = None   # that epoch's augmentation draws, one row per position of ``order``
    loss_sum: float = 0.0               # the epoch's sums so far, over all ranks (rank 0 carries them)
    correct: int = 0
    epoch_seconds: float = 0.0          # training time of the epoch so far
    history: list[EpochMetrics] = field(default_factory=list)
    elapsed: float = 0.0                # seconds the run took before this process took it up
    lr_found: dict | None = None        # what the LR range test found, for summary.json
    data_dir: str | None = None         # where the data came from (None: given in memory)
    started: float = field(default_factory=time.perf_counter, repr=False)  # when this process took it up; not saved
    # The last epoch's evaluation (of the delivered model, with TTA), for the run's end; not saved:
    # a run resumed after it evaluates again.
    final_scores: Scores | None = field(default=None, repr=False)

    def seconds(self) -> float:
        """The run's time so far, over every process that worked on it."""
        return self.elapsed + time.perf_counter() - self.started

    def steps_done(self, setup: RunSetup) -> int:
        """Training steps taken so far over the whole run: the number of the next step, from 0."""
        return self.epoch * setup.steps_per_epoch + self.batch

    def end_epoch(self, metrics: EpochMetrics) -> None:
        self.history.append(metrics)
        self.epoch, self.batch, self.order, self.draws = metrics.epoch, 0, None, None
        self.loss_sum, self.correct, self.epoch_seconds = 0.0, 0, 0.0

    def to_checkpoint(self, setup: RunSetup) -> dict[str, Any]:
        """The checkpoint's contents: this state, the weights, the optimizer and every random state
        (the same on every rank: the generator draws each epoch's order and augmentation for all)."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": setup.generator.get_state(),
                               "processes": setup.dist.world}
        if setup.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        ema = setup.ema
        return {
            "recipe": setup.recipe.to_dict(), "model": _contiguous(setup.model.state_dict()),
            "optimizer": setup.optimizer.state_dict(),
            "scaler": setup.scaler.state_dict() if setup.scaler.is_enabled() else None,
            "ema": _contiguous(ema.model.state_dict()) if ema else None, "rng": rng,
            "epoch": self.epoch, "batch": self.batch, "order": self.order.cpu() if self.order is not None else None,
            "draws": self.draws.cpu() if self.draws is not None else None,
            "loss_sum": self.loss_sum, "correct": self.correct, "epoch_seconds": self.epoch_seconds,
            "history": [asdict(h) for h in self.history], "lr_found": self.lr_found, "elapsed": self.seconds(),
            "data_dir": self.data_dir}

    @staticmethod
    def check_checkpoint(checkpoint: dict[str, Any], epochs: int) -> list[EpochMetrics]:
        """Refuse a checkpoint whose position and bookkeeping are not what ``to_checkpoint`` writes
        for a run of ``epochs`` epochs (a damaged or edited file): a ``ValueError`` saying what.
        Everything a resume reads without the run's setup is checked here, by type and range.
        Returns the checked history."""
        number, optional = (int, float), type(None)
        kinds: dict[str, type | tuple[type, ...]] = {
            "epoch": int, "batch": int, "loss_sum": number, "correct": int, "epoch_seconds": number, "elapsed": number,
            "history": list, "rng": dict, "optimizer": dict, "order": (torch.Tensor, optional),
            "draws": (torch.Tensor, optional),
            "data_dir": (str, optional), "lr_found": (dict, optional)}
        for key, kind in kinds.items():
            if not isinstance(checkpoint.get(key), kind) or isinstance(checkpoint.get(key), bool):
                raise ValueError(f"{key} is {type(checkpoint.get(key)).__name__}")
        if not 0 <= checkpoint["epoch"] <= epochs or checkpoint["batch"] < 0:
            raise ValueError(f"epoch {checkpoint['epoch']}, batch {checkpoint['batch']} lie outside the run")
        for key in ("loss_sum", "epoch_seconds", "elapsed"):  # a NaN loss sum would pass for a divergence
            if not math.isfinite(checkpoint[key]) or checkpoint[key] < 0:
                raise ValueError(f"{key} {checkpoint[key]} is not a finite number >= 0")
        if len(checkpoint["history"]) != checkpoint["epoch"]:
            raise ValueError(f"{len(checkpoint['history'])} history rows for {checkpoint['epoch']} epochs")
        check_plain(checkpoint["lr_found"], "lr_found")
        return history_from_rows(checkpoint["history"])

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], setup: RunSetup,
                        started: float | None = None) -> TrainState:
        """Load a checkpoint's weights, optimizer and random states into ``setup`` (built from the
        checkpoint's recipe) and return its state (``started``: when this process took the run up,
        by ``time.perf_counter``; default now). A checkpoint that does not fit the run (a damaged
        or edited file) raises ``ValueError``, before anything is loaded where it can."""
        checkpoint = from_before_draws(checkpoint)
        history = cls.check_checkpoint(checkpoint, setup.recipe.epochs)
        order, batch, images = checkpoint["order"], checkpoint["batch"], len(setup.train_images)
        if not 0 <= checkpoint["correct"] <= images:
            raise ValueError(f"correct {short_number(checkpoint['correct'])} is not a count of {images} images")
        # The shape before anything reads the values: a stride-0 tensor can claim 10**12 elements.
        if batch > setup.steps_per_epoch or order is not None and (
                order.dtype != torch.int64 or tuple(order.shape) != (images,)
                or not torch.equal(order.sort().values, torch.arange(images))):
            raise ValueError(f"batch {batch} or the epoch's order does not fit {setup.steps_per_epoch} steps of "
                             f"{images} images")
        draws = checkpoint["draws"]  # None at an epoch's start, with the order
        if draws is not None:
            problem = ("augmentation draws without an order" if order is None
                       else draws_problem(draws, len(order), **setup.augmentation_shape))
            if problem:
                raise ValueError(problem)
        check_optimizer_state(checkpoint["optimizer"], setup.optimizer, bool(setup.recipe.momentum_at_peak))
        for key in ("model", "ema"):
            weights = checkpoint.get(key)
            if isinstance(weights, dict) and not all(
                    not isinstance(t, torch.Tensor) or not t.is_floating_point() or bool(t.isfinite().all())
                    for t in weights.values()):
                raise ValueError(f"the {'weight average' if key == 'ema' else 'weights'} hold NaN or infinite values")
        try:
            setup.model.load_state_dict(checkpoint["model"])
            setup.optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint.get("scaler"):
                setup.scaler.load_state_dict(checkpoint["scaler"])
            if setup.ema:
                setup.ema.model.load_state_dict(checkpoint["ema"])
            _set_rng_state(setup, checkpoint["rng"])
        except (KeyError, TypeError, RuntimeError) as e:  # RuntimeError: torch's word for a tensor that does not fit
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise ValueError(f"{type(e).__name__}: {first_line}") from None
        main = setup.dist.main  # mid-epoch sums are global: rank 0 carries them, the others start from zero
        return cls(epoch=checkpoint["epoch"], batch=batch, order=order.to(setup.device) if order is not None else None,
                   draws=draws.to(setup.device) if draws is not None else None,
                   loss_sum=checkpoint["loss_sum"] if main else 0.0, correct=checkpoint["correct"] if main else 0,
                   epoch_seconds=checkpoint["epoch_seconds"], history=history,
                   elapsed=checkpoint["elapsed"], lr_found=checkpoint["lr_found"], data_dir=checkpoint["data_dir"],
                   started=time.perf_counter() if started is None else started)


# The settings of an SGD parameter group that the recipe decides (the LR is set every step, and so
# is the momentum when it cycles).
_GROUP_SETTINGS = ("momentum", "dampening", "weight_decay", "nesterov", "maximize", "lr_mult")


def check_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer,
                          momentum_cycles: bool = False) -> None:
    """A ``ValueError`` unless ``saved`` is what ``optimizer.state_dict()`` gives for this run: its
    groups' settings the recipe's (the momentum, when ``momentum_cycles``, a float in [0, 1): the
    schedule's at the step saved, set again before the next), and a finite momentum buffer of each
    parameter's shape and dtype (torch's ``load_state_dict`` checks neither, and a wrong one fails
    in the middle of a step)."""
    groups, state = saved.get("param_groups"), saved.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the optimizer state does not have the run's {len(optimizer.param_groups)} parameter groups")
    params: dict[Any, torch.Tensor] = {}
    for group, current in zip(groups, optimizer.param_groups, strict=True):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list) or \
                len(group["params"]) != len(current["params"]):
            raise ValueError("an optimizer parameter group does not hold the run's parameters")
        for name in _GROUP_SETTINGS:
            if name == "momentum" and momentum_cycles:
                if type(group.get(name)) is not float or not 0 <= group[name] < 1:
                    raise ValueError(f"optimizer setting momentum {short_number(group.get(name))} is not a momentum")
            elif type(group.get(name)) is not type(current.get(name)) or group.get(name) != current.get(name):
                raise ValueError(f"optimizer setting {name} {short_number(group.get(name))} is not the recipe's "
                                 f"{current.get(name)}")
        params.update(zip(group["params"], current["params"], strict=True))
    for key, entry in state.items():
        param = params.get(key)
        buffer = entry.get("momentum_buffer") if isinstance(entry, dict) else None
        if param is None or not isinstance(entry, dict) or set(entry) != {"momentum_buffer"} or \
                not isinstance(buffer, torch.Tensor) or \
                buffer.shape != param.shape or buffer.dtype != param.dtype or not bool(buffer.isfinite().all()):
            raise ValueError(f"optimizer state {short_number(key)} is not a finite momentum buffer of its parameter's "
                             f"shape")


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}  # channels_last weights, saved in NCHW order


def from_before_draws(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The one reader of the older layout of the same format (cifar-onecycle-checkpoint/1 written
    before an epoch's augmentation draws were saved beside its order): no ``draws`` key, and one
    augmentation generator state per process (``rng["aug"]``) where ``rng["processes"]`` now counts
    them. Read as the current layout with no draws: at an epoch's end it resumes exactly; in the
    middle of an epoch the rest of that epoch is augmented with draws made anew from the run's
    generator, not those the uninterrupted run would have used."""
    rng = checkpoint.get("rng")
    if "draws" in checkpoint or not isinstance(rng, dict) or not isinstance(rng.get("aug"), list):
        return checkpoint
    return {**checkpoint, "draws": None, "rng": {**rng, "processes": len(rng["aug"])}}


def _set_rng_state(setup: RunSetup, state: dict[str, Any]) -> None:
    world = setup.dist.world
    # Each rank's BatchNorm sees its share of every batch: another number of processes would train
    # a different run.
    written_by = state.get("processes")
    if type(written_by) is not int:
        raise KeyError("rng has no number of processes")
    if written_by != world:
        raise UserError(f"{as_setting('resume')}: the checkpoint was written by {written_by} process(es); resume it "
                        f"with the same "
                        f"number (now {world})")
    torch.set_rng_state(state["torch"])
    setup.generator.set_state(state["generator"])
    if "cuda" in state and setup.device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])
