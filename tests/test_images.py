"""Many image files read at once (``load_images``): each as ``load_image`` reads it alone, on several
threads, with the pixels decoded at once bounded and Pillow's warning silenced once for all."""
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import cifar_onecycle.images as images
from cifar_onecycle.errors import UserError
from cifar_onecycle.images import load_image, load_images


def photo(path, width=48, height=40, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def test_each_image_read_with_others_is_read_as_alone(tmp_path):
    paths = [photo(tmp_path / f"{i}.png", seed=i) for i in range(5)]
    paths += [photo(tmp_path / "grey.jpg", mode="L"), photo(tmp_path / "wide.webp", width=90, height=20)]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths[3:3] = [tmp_path / "broken.png", tmp_path / "missing.png"]
    alone = []
    for path in paths:
        try:
            alone.append(load_image(path))
        except UserError as e:
            alone.append(e)
    for threads in (1, 3):
        together = load_images(paths, threads=threads)
        assert len(together) == len(paths)
        for one, other in zip(alone, together, strict=True):
            if isinstance(one, UserError):
                assert isinstance(other, UserError) and str(other) == str(one)
            else:
                assert torch.equal(one, other)


def watch_decoding(monkeypatch, seconds=0.05):
    """The sizes of the images being converted at each moment, as a list of what was in flight."""
    in_flight: list[int] = []
    seen: list[list[int]] = []
    lock = threading.Lock()
    real = images.viewer_rgb

    def viewer_rgb(img):
        with lock:
            in_flight.append(img.size[0] * img.size[1])
            seen.append(list(in_flight))
        time.sleep(seconds)  # long enough for the other threads to start theirs
        with lock:
            in_flight.remove(img.size[0] * img.size[1])
        return real(img)

    monkeypatch.setattr(images, "viewer_rgb", viewer_rgb)
    return seen


def test_threads_decode_at_once_no_more_pixels_than_the_budget(tmp_path, monkeypatch):
    small = [photo(tmp_path / f"{i}.png", width=100, height=100, seed=i) for i in range(12)]
    large = photo(tmp_path / "large.png", width=200, height=200)
    monkeypatch.setattr(images, "PIXELS_AT_ONCE", 25_000)  # two of the small ones
    seen = watch_decoding(monkeypatch)
    load_images([*small[:6], large, *small[6:]], threads=4)
    assert max(sum(moment) for moment in seen if 40_000 not in moment) == 20_000  # two at once, never three
    assert all(moment == [40_000] for moment in seen if 40_000 in moment)  # over the budget: alone


def test_one_thread_reads_one_image_at_a_time(tmp_path, monkeypatch):
    paths = [photo(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    seen = watch_decoding(monkeypatch, seconds=0.02)
    load_images(paths, threads=1)
    assert all(len(moment) == 1 for moment in seen) and len(seen) == 4


def test_by_default_threads_read_large_files_and_one_reads_small_ones(tmp_path, monkeypatch):
    paths = [photo(tmp_path / f"{i}.png", width=100, height=100, seed=i) for i in range(6)]
    sizes = [p.stat().st_size for p in paths]
    seen = watch_decoding(monkeypatch)
    given = torch.get_num_threads()
    torch.set_num_threads(2)  # under pytest-xdist each worker has one
    try:
        monkeypatch.setattr(images, "THREADED_BYTES", max(sizes) + 1)
        load_images(paths)
        assert max(len(moment) for moment in seen) == 1
        seen.clear()
        monkeypatch.setattr(images, "THREADED_BYTES", min(sizes))
        load_images(paths)
        assert max(len(moment) for moment in seen) == 2
    finally:
        torch.set_num_threads(given)


def test_decompression_bomb_warnings_are_silenced_once_for_all_threads(tmp_path, monkeypatch):
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that: 10,000 pixels warn at 6,000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)
    paths = [photo(tmp_path / f"{i}.png", width=100, height=100, seed=i) for i in range(8)]
    paths.append(photo(tmp_path / "bomb.png", width=120, height=120))  # 14,400: refused
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        read = load_images(paths, threads=4)
        assert warnings.filters == filters  # as they were, whatever order the threads ended in
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []
    assert all(isinstance(image, torch.Tensor) for image in read[:-1])
    assert isinstance(read[-1], UserError) and "Pillow's limit against decompression bombs" in str(read[-1])


@pytest.mark.parametrize("threads", [2, 4])
def test_a_stop_drops_the_images_not_started(tmp_path, monkeypatch, threads):
    paths = [photo(tmp_path / f"{i}.png", seed=i) for i in range(40)]
    started = []
    real = images._read

    def read(path, budget):
        started.append(path)
        if len(started) == 3:
            raise KeyboardInterrupt  # as Ctrl-C in the main thread would end the wait for the results
        time.sleep(0.02)
        return real(path, budget)

    monkeypatch.setattr(images, "_read", read)
    with pytest.raises(KeyboardInterrupt):
        load_images(paths, threads=threads)
    assert len(started) < len(paths) // 2  # the rest were dropped, not read before the stop was seen
