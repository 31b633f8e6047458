"""Weights files and checkpoints. Weights are safetensors, checkpoints are read with
``weights_only``: loading either runs no code from the file.

The resolved recipe travels in the file's metadata, so ``evaluate`` can rebuild the exact model
(logit scale included) from the weights alone.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import UserError
from .files import MAX_CHECKPOINT_BYTES, MAX_WEIGHTS_BYTES, atomic_write, parse_json, read_capped, safetensors_metadata
from .model import ResNet9
from .recipe import Recipe, RecipeError
from .safe_pickle import Refused, scan_pickle

WEIGHTS = "model.safetensors"


def save_weights(model: torch.nn.Module, path: str | Path, recipe: Recipe) -> None:
    """The model's state dict (parameters and BatchNorm statistics) as safetensors, with its recipe."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    # channels_last weights are not contiguous in NCHW order; safetensors stores plain NCHW.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, st_save(tensors, metadata={"recipe": json.dumps(recipe.to_dict()),
                                                  "format": "cifar-onecycle/1"}))


def load_weights(path: str | Path) -> tuple[ResNet9, Recipe]:
    """Rebuild the model a weights file was saved from; refuse files of another shape or model."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    raw = _read(path, "weights", f"give a run folder or its {WEIGHTS}", MAX_WEIGHTS_BYTES)
    try:
        tensors = st_load(raw)
        meta = safetensors_metadata(raw)
    except (SafetensorError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a safetensors weights file ({e})") from None
    try:
        recipe = Recipe.from_dict(parse_json(meta["recipe"]), source=f"{path} (metadata)")
    except (KeyError, ValueError, RecipeError, TypeError) as e:
        raise UserError(f"{path}: no cifar-onecycle recipe in its metadata ({e}); was it written by "
                        f"cifar-onecycle?") from None
    model = recipe.model()
    _check_fits(model, tensors, path)
    model.load_state_dict(tensors)
    return model, recipe


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "cifar-onecycle-checkpoint/1"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``state`` (tensors, numbers, strings, lists and dicts only) with torch.save, atomically."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
    atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> tuple[dict, Recipe]:
    """Read a checkpoint without running any code from it (``weights_only=True``), and check it
    belongs to this model. Returns (state, recipe)."""
    path = Path(path)
    raw = _read(path, "checkpoint", "is this a run folder that reached the end of an epoch?", MAX_CHECKPOINT_BYTES)
    _check_stored(raw, path)
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # a refused global, a truncated zip, garbage: all mean the same to a user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable checkpoint, refused ({first})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a cifar-onecycle checkpoint")
    try:
        recipe = Recipe.from_dict(state["recipe"], source=f"{path} (recipe)")
    except (KeyError, TypeError, RecipeError) as e:
        raise UserError(f"{path}: checkpoint has no valid recipe ({e})") from None
    _check_fits(recipe.model(), state.get("model"), path)
    return state, recipe


def _read(path: Path, what: str, hint: str, limit: int) -> bytes:
    try:
        return read_capped(path, limit, f"{what} file this program writes", "refused")
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e}); {hint}") from None


# A checkpoint's pickle takes about 5,400 opcodes and 1,200 memo entries, and 30 opcodes more for
# each epoch of its history: 305,000 at the largest run a recipe allows (10,000 epochs). The caps
# bound the objects torch.load builds from a file (200 million empty sets fit in 252 MB, and took
# 46 GB to unpickle) to about a million, and the scan takes about a second at most.
MAX_CHECKPOINT_OPCODES = 1_000_000


def _check_stored(raw: bytes, path: Path) -> None:
    """torch.save stores its zip members uncompressed; a compressed member could unpack to any size
    inside torch.load, so one is refused, as is a total above the checkpoint ceiling. The pickle
    itself is walked by ``scan_pickle`` before torch.load builds anything from it."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            members = archive.infolist()
            if any(m.compress_type != zipfile.ZIP_STORED for m in members) or \
                    sum(m.file_size for m in members) > MAX_CHECKPOINT_BYTES:
                raise UserError(f"{path}: not a checkpoint this program wrote (compressed or oversized members); "
                                f"refused")
            pickles = [archive.read(m) for m in members if m.filename.endswith(".pkl")]
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a loadable checkpoint, refused (not a zip archive: {e})") from None
    for stream in pickles:
        try:
            scan_pickle(stream, MAX_CHECKPOINT_OPCODES, MAX_CHECKPOINT_OPCODES)
        except Refused as e:
            raise UserError(f"{path}: not a checkpoint this program wrote ({e}); refused") from None
        except Exception as e:  # a broken stream: pickletools raises errors of several kinds
            raise UserError(f"{path}: not a loadable checkpoint, refused (its pickle is damaged: "
                            f"{type(e).__name__})") from None


def _check_fits(model: ResNet9, tensors: Any, path: Path) -> None:
    """Refuse tensors that are not exactly this model's state dict (names and shapes)."""
    expected = model.state_dict()
    if not isinstance(tensors, dict) or set(tensors) != set(expected) or any(
            not isinstance(tensors[k], torch.Tensor) or tensors[k].shape != v.shape for k, v in expected.items()):
        raise UserError(f"{path}: weights do not fit the seed's ResNet (another model, or other tensor shapes)")
