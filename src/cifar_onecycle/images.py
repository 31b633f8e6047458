"""Image files as the model sees them: decoded, oriented and converted as an image viewer shows
them, then brought to 32x32 by one rule (``load_image``), for predict and for a folder of images."""
from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .files import open_regular

SIZE = 32
# Pillow refuses images above ~179 megapixels as decompression bombs; that limit stays (about 0.5 GB
# decoded). Its warning from ~89 megapixels, two lines from inside Pillow, is not shown: a camera's
# large photo is not an attack, and the limit that matters is the refusal.


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 [3, 32, 32] RGB, as a viewer shows it (``viewer_rgb``, after its EXIF
    orientation; a GIF's first frame), its shorter side resized to 32 pixels (Lanczos) and its
    centre cropped square: the one rule for predict and for a folder of images. A file that is not
    an image (or not a regular file) is a UserError naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Image.open warns as it reads the size
            with open_regular(path) as f, Image.open(f) as img:
                img.draft("RGB", (64, 64))  # JPEG: decode at a reduced size; a no-op for other formats
                upright = ImageOps.exif_transpose(img)  # a phone's photo is stored sideways, with a tag
                rgb = viewer_rgb(upright)
                side = min(rgb.size)
                left, top = (rgb.size[0] - side) // 2, (rgb.size[1] - side) // 2
                small = rgb.resize((SIZE, SIZE), Image.Resampling.LANCZOS,
                                   box=(left, top, left + side, top + side), reducing_gap=2.0)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path}: over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} million pixels, Pillow's limit "
                        f"against decompression bombs; give a smaller copy") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError,
            struct.error) as e:  # Pillow's decoders signal a malformed file with each of these
        raise UserError(f"{path}: not an image Pillow can read ({type(e).__name__})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the image ({e.strerror or e})") from None
    pixels = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8)
    return pixels.view(SIZE, SIZE, 3).permute(2, 0, 1).contiguous()


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


