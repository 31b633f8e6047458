"""Classify image files of any size with a trained model (resized to 32x32 with Pillow)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import CLASSES
from .errors import UserError

# Pillow refuses images above ~179 megapixels as decompression bombs; that limit stays.


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 [3, 32, 32] RGB; a file that is not an image is a UserError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at a reduced size; a no-op for other formats
            small = img.convert("RGB").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not an image Pillow can read ({type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the image ({e})") from None
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1).contiguous()


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] | None = None   # (class, probability), best first
    error: str | None = None


def predict_files(model: torch.nn.Module, paths: list[str], top_k: int = 3) -> list[Prediction]:
    """Top-k classes for each file; a file that fails gets its error and the others are still done."""
    from .report import predict_probabilities

    out: list[Prediction] = []
    for p in paths:
        try:
            image = load_image(p)
        except UserError as e:
            out.append(Prediction(str(p), error=str(e)))
            continue
        probs = predict_probabilities(model, image[None])[0]
        values, idx = probs.topk(top_k)
        out.append(Prediction(str(p), [(CLASSES[i], v) for i, v in zip(idx.tolist(), values.tolist(), strict=False)]))
    return out
