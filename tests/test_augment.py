import torch

from cifar_onecycle.augment import (
    CIFAR10_MEAN,
    apply_augmentation,
    augment_batch,
    crop_at,
    cutout_at,
    draw_augmentation,
    draws_problem,
    epoch_batches,
    flip_where,
    normalize,
    pad_reflect,
)


def draws(n, seed, padding=4, cutout_size=8):
    return draw_augmentation(n, size=32, padding=padding, cutout_size=cutout_size,
                             generator=torch.Generator().manual_seed(seed))


def images(n=64, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_reflect_padding():
    x = images(2)
    p = pad_reflect(x, 4)
    assert p.shape == (2, 3, 40, 40) and p.dtype == torch.uint8
    assert torch.equal(p[:, :, 4:36, 4:36], x)
    assert torch.equal(p[:, :, 4:36, 3], x[:, :, :, 1])   # reflect, not replicate or zero
    assert torch.equal(p[:, :, 0, 4:36], x[:, :, 4, :])


def test_crop_offsets_are_exact_and_cover_the_range():
    p = pad_reflect(images(512), 4)
    off = draws(512, 1)[:, 0:2]
    crops = crop_at(p, 32, off)
    assert crops.shape == (512, 3, 32, 32)
    for i in range(512):
        dy, dx = off[i].tolist()
        assert torch.equal(crops[i], p[i, :, dy:dy + 32, dx:dx + 32])
    assert off.min() == 0 and off.max() == 8
    assert set(off[:, 0].tolist()) == set(range(9)) and set(off[:, 1].tolist()) == set(range(9))


def test_flip_exact():
    x = images(256)
    flipped = draws(256, 2)[:, 2].bool()
    out = flip_where(x, flipped)
    assert torch.equal(out[flipped], x[flipped].flip(-1))
    assert torch.equal(out[~flipped], x[~flipped])
    assert 0.35 < flipped.float().mean() < 0.65


def test_cutout_area_and_fill():
    x = normalize(images(256)) + 5.0  # no pixel is 0 before the hole
    corners = draws(256, 3)[:, 3:5]
    out = cutout_at(x, 8, corners)
    zeroed = (out == 0).all(1)  # N,H,W: a hole covers all three channels
    assert zeroed.sum((1, 2)).tolist() == [64] * 256
    for i in range(256):
        y, x0 = corners[i].tolist()
        assert 0 <= y <= 24 and 0 <= x0 <= 24
        assert zeroed[i, y:y + 8, x0:x0 + 8].all()
    assert torch.equal(out[~zeroed[:, None].expand_as(out)], x[~zeroed[:, None].expand_as(x)])


def test_normalize_maps_the_dataset_mean_to_zero():
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1) * 255
    assert torch.allclose(normalize(mean.expand(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2), atol=1e-6)


def test_augment_reproducible_and_switchable():
    p = pad_reflect(images(32), 4)
    kw = dict(crop=True, padding=4, flip=True, cutout_size=8)
    a = augment_batch(p, generator=torch.Generator().manual_seed(7), **kw)
    b = augment_batch(p, generator=torch.Generator().manual_seed(7), **kw)
    c = augment_batch(p, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    x = images(32)
    off = augment_batch(x, crop=False, padding=0, flip=False, cutout_size=0, generator=torch.Generator())
    assert torch.equal(off, normalize(x))


def test_crop_then_flip_then_cutout_exact_pixels():
    n = 16
    padded = pad_reflect(images(n, seed=3), 4)
    out = augment_batch(padded, crop=True, padding=4, flip=True, cutout_size=8,
                        generator=torch.Generator().manual_seed(11))
    # The documented draws, in the documented order, from a generator with the same seed.
    g = torch.Generator().manual_seed(11)
    dy, dx = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    flipped = torch.rand(n, generator=g) < 0.5
    hy, hx = torch.randint(0, 25, (n,), generator=g), torch.randint(0, 25, (n,), generator=g)
    for i in range(n):
        want = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]   # 1. RandomCrop 32 of the padded image
        want = want.flip(-1) if flipped[i] else want              # 2. FlipLR of the crop
        want = normalize(want[None])[0]
        want[:, hy[i]:hy[i] + 8, hx[i]:hx[i] + 8] = 0.0            # 3. CutOut: the hole holds the mean
        assert torch.equal(out[i], want), i
    # every sample its own draws
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=False))) > n // 2 and 0 < int(flipped.sum()) < n
    assert len(set(zip(hy.tolist(), hx.tolist(), strict=False))) > n // 2


def test_an_epochs_batches_do_not_depend_on_how_many_are_augmented_at_once():
    """Augmenting several batches together (a GPU's choice: fewer kernel launches) or starting
    mid-epoch (a resume) gives the images one batch at a time would: each position has its draw."""
    n, batch = 70, 8
    padded = pad_reflect(images(n, seed=5), 4)
    labels = torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    epoch_draws = draws(n, 4)
    kw = dict(crop=True, padding=4, flip=True, cutout_size=8, order=order, draws=epoch_draws)
    one_at_a_time = list(epoch_batches(padded, labels, batch, **kw))
    assert len(one_at_a_time) == n // batch
    for at_once in (2, 3, 100):
        together = list(epoch_batches(padded, labels, batch, batches_at_once=at_once, **kw))
        assert len(together) == len(one_at_a_time)
        for (x, y), (x1, y1) in zip(together, one_at_a_time, strict=True):
            assert torch.equal(y, y1) and torch.equal(x, x1)
            assert x.is_contiguous(memory_format=torch.channels_last)
    resumed = list(epoch_batches(padded, labels, batch, start=5, batches_at_once=3, **kw))
    assert all(torch.equal(x, x1) for (x, _), (x1, _) in zip(resumed, one_at_a_time[5:], strict=True))
    # the image at position p is order[p], augmented by draws[p]
    p = 3 * batch + 2
    want = apply_augmentation(padded[order[p]][None], epoch_draws[p][None], crop=True, padding=4, flip=True,
                              cutout_size=8)
    assert torch.equal(one_at_a_time[3][0][2], want[0])
    # and the ranks' shares of a group are the same images as one process's batches
    halves = [list(epoch_batches(padded, labels, batch, rank=r, world=2, batches_at_once=4, **kw)) for r in (0, 1)]
    for i, (x, y) in enumerate(one_at_a_time):
        assert torch.equal(torch.cat([halves[0][i][0], halves[1][i][0]]), x)
        assert torch.equal(torch.cat([halves[0][i][1], halves[1][i][1]]), y)


def test_draws_read_back_are_checked():
    good = draws(10, 0)
    assert draws_problem(good, 10, size=32, padding=4, cutout_size=8) is None
    assert "outside 0..8" in draws_problem(good + 9, 10, size=32, padding=4, cutout_size=8)
    bad_hole = good.clone()
    bad_hole[3, 4] = 25  # the hole would reach past the image's edge
    assert "hole_x outside 0..24" in draws_problem(bad_hole, 10, size=32, padding=4, cutout_size=8)
    assert "not int64 (11, 5)" in draws_problem(good, 11, size=32, padding=4, cutout_size=8)
    assert "not int64" in draws_problem(good.int(), 10, size=32, padding=4, cutout_size=8)
