"""Image files as the model sees them: decoded, oriented and converted as an image viewer shows
them, then brought to 32x32 by one rule (``load_image``), for predict and for a folder of images;
``load_images`` reads many at once on the process's cores."""
from __future__ import annotations

import os
import struct
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .files import open_regular

SIZE = 32
# Pillow refuses images above ~179 megapixels as decompression bombs; that limit stays (about 0.5 GB
# decoded). Its warning from ~89 megapixels, two lines from inside Pillow, is not shown: a camera's
# large photo is not an attack, and the limit that matters is the refusal.
# Threads decode at once at most this many pixels in all (as decoded: a JPEG at its draft size), or
# one larger image alone: reading in parallel never holds more decoded pixels than one image at
# Pillow's limit did, read alone. 64 million is eight 8-megapixel PNGs.
PIXELS_AT_ONCE = 64_000_000
# Pillow lets go of Python's lock while it decodes and resizes, so threads read large images about as
# many times faster as there are cores (1024x768 photos, 3/4 JPEG and 1/4 PNG, on 2 AVX2-only cores:
# 0.52 of the time with 2 threads); a small image's time is Python's own, and there threads fight over
# its lock (the proxy's 1 KB JPEGs: 1.5 times the time). The two break even at a JPEG of 256 pixels
# a side, about 16 KB (benchmarks/results/README.md, "A folder of images").
THREADED_BYTES = 16 * 1024
# Pillow's reason for refusing a file is shown cut to this many characters: it may quote the file
MAX_REASON = 200


def load_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 [3, 32, 32] RGB, as a viewer shows it (``viewer_rgb``, after its EXIF
    orientation; a GIF's first frame), its shorter side resized to 32 pixels (Lanczos) and its
    centre cropped square: the one rule for predict and for a folder of images. A file that is not
    an image (or not a regular file) is a UserError naming it."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Image.open warns as it reads the size
        return _read(path, _PixelBudget(None))


def load_images(paths: Sequence[str | Path], threads: int | None = None) -> list[torch.Tensor | UserError]:
    """``load_image`` of each path, in order: its tensor, or the UserError reading it raised. Read by
    ``threads`` threads, at most ``PIXELS_AT_ONCE`` pixels at a time. None: ``reading_threads`` of
    the files' sizes."""
    from PIL import Image

    if threads is None:
        threads = reading_threads(sum(map(_file_size, paths)), len(paths))
    threads = max(1, threads)
    budget = _PixelBudget(PIXELS_AT_ONCE if threads > 1 else None)

    def read(path: str | Path) -> torch.Tensor | UserError:
        try:
            return _read(path, budget)
        except UserError as e:
            return e

    # The warnings filter is the process's: set here, once, not by each thread (catch_warnings in
    # threads restores one thread's filters over another's).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if threads == 1:
            return [read(p) for p in paths]
        pool = ThreadPoolExecutor(threads, thread_name_prefix="load_images")
        try:
            return list(pool.map(read, paths))
        finally:  # on Ctrl-C too: the images not started are dropped, not read before the stop is seen
            pool.shutdown(wait=True, cancel_futures=True)


def reading_threads(total_bytes: int, files: int) -> int:
    """The threads to read ``files`` image files of ``total_bytes`` in all with: torch's thread count
    (the cores this process is given) when they are ``THREADED_BYTES`` a file or more on average,
    else one."""
    return torch.get_num_threads() if total_bytes >= THREADED_BYTES * files else 1


class _PixelBudget:
    """The pixels being decoded at once, held to ``limit`` (None: no limit): an image larger than
    the limit waits until it can be read alone."""

    def __init__(self, limit: int | None):
        self.limit, self.held = limit, 0
        self.changed = threading.Condition()

    def hold(self, n: int) -> None:
        if self.limit is None:
            return
        with self.changed:
            self.changed.wait_for(lambda: self.held == 0 or self.held + n <= (self.limit or 0))
            self.held += n

    def release(self, n: int) -> None:
        if self.limit is None:
            return
        with self.changed:
            self.held -= n
            self.changed.notify_all()


def _file_size(path: str | Path) -> int:
    try:
        return os.stat(path).st_size
    except (OSError, ValueError):  # reading it will say what is wrong
        return 0


def _read(path: str | Path, budget: _PixelBudget) -> torch.Tensor:
    """``load_image``'s rule, the warnings filter left to the caller."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with open_regular(path) as f, Image.open(f) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at a reduced size; a no-op for other formats
            size = img.size[0] * img.size[1]
            budget.hold(size)
            try:
                upright = ImageOps.exif_transpose(img)  # a phone's photo is stored sideways, with a tag
                rgb = viewer_rgb(upright)
                side = min(rgb.size)
                left, top = (rgb.size[0] - side) // 2, (rgb.size[1] - side) // 2
                small = rgb.resize((SIZE, SIZE), Image.Resampling.LANCZOS,
                                   box=(left, top, left + side, top + side), reducing_gap=2.0)
            finally:
                budget.release(size)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Image.DecompressionBombError:
        raise UserError(f"{path}: over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} million pixels, Pillow's limit "
                        f"against decompression bombs; give a smaller copy") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError,
            struct.error) as e:  # Pillow's decoders signal a malformed file with each of these
        # Pillow's words say what is wrong ("broken PNG file", a text chunk too large to decompress);
        # an UnidentifiedImageError's only repeat the path
        words = "" if isinstance(e, UnidentifiedImageError) else str(e)[:MAX_REASON]
        raise UserError(f"{path}: not an image Pillow can read ({type(e).__name__}"
                        + (f": {words})" if words else ")")) from None
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


