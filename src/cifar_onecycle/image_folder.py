"""A folder of the user's own images (``dataset = "folder"``), in ImageFolder's layout:

    DIR/train/<class>/*.png|jpg|jpeg|webp|bmp|gif     (sub-folders of a class folder count too)
    DIR/test/<class>/*...

Class names are the folder names, sorted; train and test must have the same ones. The training
images are held in a fixed order that mixes the classes (``_scrambled``); the test images in path
order. Each image is
read by ``images.load_image`` (oriented, converted as a viewer shows it, shorter side to 32 pixels,
centre cropped) into the uint8 tensors training uses. Files of other kinds and names starting with
a dot are not images of the set; symbolic links to folders are not followed (a link loop cannot
trap the walk).

Decoding takes 0.15 to 0.5 ms a 32-pixel JPEG on one core of this project's CPUs, a camera's photo
milliseconds (those are read on every core: ``images.load_images``), so the result is cached
in ``DIR/.cifar-onecycle-cache.safetensors`` (safetensors: reading it runs no code). The cache
records a fingerprint of every file it was built from (split, class, path, size, modification
time) and the reading rule's version; one that does not match the folder as it is now, or whose
tensors do not have the shapes and values the listing implies, is rebuilt, never trusted. A folder
that cannot be written to is read without a cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .data import LabelledImages
from .errors import DatasetError, UserError, WriteError, as_setting
from .files import atomic_write, parse_json, read_capped, safetensors_metadata
from .images import SIZE, load_images, reading_threads
from .recipe import MAX_CLASS_NAME, MAX_CLASSES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SPLITS = ("train", "test")
# A split of a million images is 3 GB of uint8 pixels (CIFAR-10's training set: 150 MB); a file of an
# image over 64 MB is a photograph no 32-pixel model needs. Both keep a folder from deciding how much
# memory is taken before any image is read.
MAX_FOLDER_IMAGES = 1_000_000
MAX_IMAGE_FILE_BYTES = 64 * 2**20
# Images are read this many at a time, on all the process's cores (``images.load_images``), each
# chunk copied into the split's tensor as it is done: the decoded chunk is 3 MB beside it.
DECODE_CHUNK = 1024
CACHE = ".cifar-onecycle-cache.safetensors"
CACHE_FORMAT = "cifar-onecycle-folder-cache/1"
READING_RULE = "load_image/1: exif, viewer rgb, shorter side to 32 (lanczos), centre crop; train order blake2b/1"


@dataclass(frozen=True)
class Listing:
    """The image files of one split, in label order then path order: (path, label, size, mtime_ns)."""

    classes: tuple[str, ...]
    files: tuple[tuple[Path, int, int, int], ...]


def image_files(folder: Path, limit: int) -> list[Path] | None:
    """The image files below ``folder``, sorted: PNG, JPEG, WebP, BMP and GIF by their names' endings,
    in sub-folders too (links to folders are not followed), leaving out names that start with a dot.
    None once there are more than ``limit``: a folder must not decide how long the listing takes."""
    found: list[Path] = []
    for parent, subfolders, names in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(parent) / n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_SUFFIXES)]
        if len(found) > limit:
            return None
    return sorted(found)


def list_split(root: Path, split: str) -> Listing:
    """The classes and image files of ``root/split``, every refusal a one-line ``DatasetError``."""
    base = root / split
    if not base.is_dir():
        inside = root.name in ("train", "test") and (root.parent / split).is_dir()  # a split given for its parent
        hint = f" (give its parent, {root.parent})" if inside else ""
        raise DatasetError(f"{as_setting('data_dir')} {root}: no {split}/ folder; a folder of images holds "
                           f"train/<class>/ and test/<class>/{hint}")
    classes = tuple(sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith(".")))
    if not 2 <= len(classes) <= MAX_CLASSES:
        raise DatasetError(f"{base}: {len(classes)} class folders; give 2 to {MAX_CLASSES:,}")
    if any(len(c) > MAX_CLASS_NAME for c in classes):
        raise DatasetError(f"{base}: a class folder's name is over {MAX_CLASS_NAME} characters")
    for c in classes:  # the names go into recipe.toml and the weights' metadata, which are UTF-8
        try:
            c.encode("utf-8")
        except UnicodeEncodeError:
            raise DatasetError(f"{base}: the class folder {c.encode('utf-8', 'surrogateescape')!r} has a name that "
                               f"is not UTF-8; rename it") from None
    files: list[tuple[Path, int, int, int]] = []
    for label, name in enumerate(classes):
        found = image_files(base / name, MAX_FOLDER_IMAGES - len(files))
        if found is None:
            raise DatasetError(f"{base}: more than {MAX_FOLDER_IMAGES:,} images; the data set is held in memory")
        if not found and split == "train":
            raise DatasetError(f"{base / name}: no images (PNG, JPEG, WebP, BMP or GIF); every class needs training "
                               f"images")
        for path in found:
            try:
                info = path.stat()
                files.append((path, label, info.st_size, info.st_mtime_ns))
            except OSError:  # a dangling link: reading it will say so
                files.append((path, label, -1, -1))
    return Listing(classes, tuple(files))


def _fingerprint(listings: dict[str, Listing]) -> str:
    digest = hashlib.sha256(READING_RULE.encode())
    for split, listing in listings.items():
        digest.update(json.dumps([split, listing.classes]).encode())
        for path, label, size, mtime in listing.files:
            digest.update(f"{split}\t{label}\t{path}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def load_folder(data_dir: str | Path, split: str = "both", skip_bad_images: bool = False) -> LabelledImages:
    """The images of ``data_dir`` (train and test, or with ``split="test"`` the test images only,
    checked against train's classes), from the cache when it matches the folder. An image that
    cannot be read is a ``DatasetError`` naming it; with ``skip_bad_images`` it is left out and
    named in the result's ``skipped``."""
    root = Path(data_dir)
    try:
        listings = {s: list_split(root, s) for s in SPLITS}
    except OSError as e:
        raise DatasetError(f"{as_setting('data_dir')} {root}: cannot read it ({e.strerror or e})") from None
    train, test = listings["train"].classes, listings["test"].classes
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise DatasetError(f"{root}: train/ and test/ must have the same classes; "
                           + "; ".join(f"only in {where}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                                       for where, names in (("train", only_train), ("test", only_test)) if names))
    if not listings["test"].files:
        raise DatasetError(f"{root / 'test'}: no images; the test set scores the model")
    fingerprint = _fingerprint(listings)
    data = _read_cache(root, fingerprint, listings, skip_bad_images)
    if data is None:
        data = _decode(listings, skip_bad_images, root / "train")
        _write_cache(root, fingerprint, data)
    if split == "test":
        data = LabelledImages(data.train_images[:0], data.train_labels[:0], data.test_images, data.test_labels,
                              data.classes, data.skipped)
    return data


def _scrambled(path: Path) -> bytes:
    """A training image's place: a hash of its path under train/. The images are read in this fixed,
    class-mixed order, as CIFAR-10's files hold them, so that the first N of ``train_subset`` are a
    sample of every class (in folder order the first 10,000 of the proxy were two classes) and the
    order does not depend on the library versions or on where the folder is."""
    return hashlib.blake2b(path.as_posix().encode("utf-8", "surrogateescape"), digest_size=8).digest()


def _decode(listings: dict[str, Listing], skip_bad_images: bool, root: Path) -> LabelledImages:
    tensors: list[torch.Tensor] = []
    skipped: list[str] = []
    for split in SPLITS:
        files = listings[split].files
        if split == "train":
            files = tuple(sorted(files, key=lambda f: _scrambled(f[0].relative_to(root))))
        images = torch.empty(len(files), 3, SIZE, SIZE, dtype=torch.uint8)
        labels = torch.empty(len(files), dtype=torch.int64)
        kept = 0
        for start in range(0, len(files), DECODE_CHUNK):
            chunk = files[start:start + DECODE_CHUNK]
            # The size is known from the listing: an oversized file is refused without a read.
            readable = [(path, size) for path, _, size, _ in chunk if size <= MAX_IMAGE_FILE_BYTES]
            # the threads chosen from the listing's sizes: no file is looked at again for them
            decoded = iter(load_images([path for path, _ in readable],
                                       reading_threads(sum(size for _, size in readable), len(readable))))
            for path, label, size, _ in chunk:
                image = next(decoded) if size <= MAX_IMAGE_FILE_BYTES else UserError(
                    f"{path}: {size:,} bytes, larger than any image this program reads (at most "
                    f"{MAX_IMAGE_FILE_BYTES:,})")
                if isinstance(image, UserError):
                    if not skip_bad_images:
                        raise DatasetError(f"{image}; remove it, or pass {as_setting('skip_bad_images')}")
                    skipped.append(str(path))
                    continue
                images[kept], labels[kept] = image, label
                kept += 1
        tensors += [images[:kept].clone() if kept < len(files) else images, labels[:kept]]
    if not len(tensors[2]):
        raise DatasetError("every test image was skipped as unreadable; the test set scores the model")
    return LabelledImages(tensors[0], tensors[1], tensors[2], tensors[3], listings["train"].classes, tuple(skipped))


def _write_cache(root: Path, fingerprint: str, data: LabelledImages) -> None:
    tensors = {"train_images": data.train_images, "train_labels": data.train_labels,
               "test_images": data.test_images, "test_labels": data.test_labels}
    meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "classes": json.dumps(list(data.classes)),
            "skipped": json.dumps(list(data.skipped))}
    with contextlib.suppress(WriteError):  # a read-only folder: every run decodes it again, slower, not wrong
        atomic_write(root / CACHE, st_save(tensors, metadata=meta))


def _read_cache(root: Path, fingerprint: str, listings: dict[str, Listing],
                skip_bad_images: bool) -> LabelledImages | None:
    """The cached tensors if the cache was built from exactly these files by this rule, and holds
    what they imply; None (rebuild) otherwise."""
    counts = {s: len(listings[s].files) for s in SPLITS}
    limit = sum(counts.values()) * (3 * SIZE * SIZE + 8) + 16 * 2**20  # the tensors, and a header of names
    try:
        raw = read_capped(root / CACHE, limit, "cache of this folder", "rebuilding it")
        header = safetensors_metadata(raw)
        if header.get("format") != CACHE_FORMAT or header.get("fingerprint") != fingerprint:
            return None
        skipped = parse_json(header["skipped"])
        if not isinstance(skipped, list) or skipped and not skip_bad_images:
            return None  # without skip_bad_images, the bad file must be named again
        tensors = st_load(raw)
        classes = listings["train"].classes
        for split in SPLITS:
            images, labels = tensors[f"{split}_images"], tensors[f"{split}_labels"]
            n = len(labels)
            if images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, SIZE, SIZE) or \
                    labels.dtype != torch.int64 or labels.dim() != 1 or n > counts[split] or \
                    n and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
                return None
        if sum(len(tensors[f"{s}_labels"]) for s in SPLITS) + len(skipped) != sum(counts.values()):
            return None
    except (OSError, UserError, ValueError, KeyError, TypeError, AttributeError, SafetensorError, UnicodeDecodeError):
        return None  # whatever is wrong with it, the folder itself is the truth
    return LabelledImages(tensors["train_images"], tensors["train_labels"], tensors["test_images"],
                          tensors["test_labels"], classes, tuple(str(s) for s in skipped))
