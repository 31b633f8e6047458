"""Classify image files of any size with a trained model (resized to 32x32 with Pillow)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import CLASSES
from .errors import UserError
from .files import open_regular

# Pillow refuses images above ~179 megapixels as decompression bombs; that limit stays.


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 [3, 32, 32] RGB, as a viewer shows it (``viewer_rgb``, after its EXIF
    orientation); a file that is not an image (or not a regular file) is a UserError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with open_regular(path) as f, Image.open(f) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at a reduced size; a no-op for other formats
            upright = ImageOps.exif_transpose(img)  # a phone's photo is stored sideways, with a tag
            small = viewer_rgb(upright).resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not an image Pillow can read ({type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the image ({e.strerror or e})") from None
    return torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1).contiguous()


def viewer_rgb(img: Any) -> Any:
    """``img`` in 8-bit RGB as an image viewer shows it. Pillow's own conversion clips 16- and
    32-bit samples at 255 (a 16-bit grey of mean 127 came out white): those are scaled to 0..255
    from their range (16-bit: /257; 32-bit integers by their largest value beyond 16 bits; floats
    from 0..1, or clipped to 0..255 when larger). Transparency is laid over white; palette, CMYK
    and the rest convert as Pillow converts them."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(values.max()) if values.size else 0.0
        if img.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 1.0 if top <= 255 else 1 / 257 if top <= 65535 else 255.0 / top
        img = Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or img.mode == "P" and "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] | None = None   # (class, probability), best first
    error: str | None = None


def predict_files(model: torch.nn.Module, paths: list[str], top_k: int = 3,
                  batch_size: int = 256) -> list[Prediction]:
    """Top-k classes for each file; a file that fails gets its error and the others are still done.
    Decoded one at a time (each 3 KB once at 32x32), predicted ``batch_size`` at once. Outputs that
    are not finite (damaged weights) are an error for that file, not a class at "nan%"."""
    from .report import predict_probabilities

    out: list[Prediction] = []
    images: list[tuple[int, torch.Tensor]] = []
    for p in paths:
        try:
            images.append((len(out), load_image(p)))
            out.append(Prediction(str(p)))
        except UserError as e:
            out.append(Prediction(str(p), error=str(e)))
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        probabilities = predict_probabilities(model, torch.stack([image for _, image in chunk]))
        for (i, _), probs in zip(chunk, probabilities, strict=True):
            if not torch.isfinite(probs).all():
                out[i].error = f"{out[i].path}: the model's outputs are not finite numbers (damaged weights?)"
                continue
            values, idx = probs.topk(top_k)
            out[i].top = [(CLASSES[k], v) for k, v in zip(idx.tolist(), values.tolist(), strict=True)]
    return out
