"""The candidates for `best` that keep the seed's network: ghost batch norm, frozen BatchNorm scales
with a faster bias LR, alternating flips and translated test-time augmentation. Each is a recipe
setting, off by default, and does what it says."""
import pytest
import torch
import torch.nn.functional as F

from cifar_onecycle import Cifar10, Recipe, ResNet9, count_parameters, summarize
from cifar_onecycle.augment import DRAW_COLUMNS, normalize
from cifar_onecycle.evaluation import logits_of, tta_logits
from cifar_onecycle.model import ghost_batch_norm
from cifar_onecycle.run_setup import setup_run
from cifar_onecycle.step import make_optimizer, train_step
from test_train import TINY


def test_ghost_batch_norm_normalises_each_group_by_its_own_statistics():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4, momentum=0.3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(12, 4, 5, 5) * 3 + 1
    reference = [torch.nn.BatchNorm2d(4, momentum=0.3) for _ in range(3)]
    for r in reference:
        r.load_state_dict(bn.state_dict())
    out = ghost_batch_norm(bn.train(), x, 4)
    expected = torch.cat([r.train()(chunk) for r, chunk in zip(reference, x.split(4), strict=True)])
    assert torch.allclose(out, expected, atol=1e-5)
    # The running statistics move once, towards the groups' mean statistics.
    assert torch.allclose(bn.running_mean, torch.stack([r.running_mean for r in reference]).mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, torch.stack([r.running_var for r in reference]).mean(0), atol=1e-6)
    assert int(bn.num_batches_tracked) == 1
    # Gradients reach the scale and bias as through plain BatchNorm on each group.
    out.square().sum().backward()
    sum(r(chunk).square().sum() for r, chunk in zip(reference, x.split(4), strict=True)).backward()
    assert torch.allclose(bn.weight.grad, sum(r.weight.grad for r in reference), atol=1e-3)
    # In evaluation, or with one group, it is BatchNorm itself.
    bn.eval()
    assert torch.equal(ghost_batch_norm(bn, x, 4), bn(x))
    bn.train()
    plain = torch.nn.BatchNorm2d(4)
    plain.load_state_dict(bn.state_dict())
    assert torch.equal(ghost_batch_norm(bn, x, 12), plain.train()(x))


def test_ghost_batches_keep_the_seeds_network():
    model = Recipe(bn_ghost_batch=64).model()
    assert count_parameters(model) == 6_573_130
    assert summarize(model).table() == summarize(ResNet9()).table()
    assert all(m.ghost_batch == 64 for m in model.modules() if hasattr(m, "ghost_batch"))
    with pytest.raises(Exception, match="bn_ghost_batch 100 must divide batch_size 512"):
        Recipe(bn_ghost_batch=100)


# fused: as a GPU trains (fused SGD, bf16 autocast; the CPU's default is the for-each SGD in fp32),
# so that the parameter groups are seen to work with the fused update on every run of the suite
@pytest.mark.parametrize("fused", [False, True])
def test_frozen_scales_stay_at_one_and_biases_take_their_lr_multiplier(fused):
    recipe = Recipe(bn_scale_frozen=True, bn_bias_lr_mult=8.0)
    torch.manual_seed(0)
    model = recipe.model()
    optimizer = make_optimizer(model, recipe, torch.device("cpu"), fused=fused)
    assert optimizer.defaults["fused"] is (True if fused else None)
    n = 4 if fused else 8  # bf16 is emulated on an AVX2-only CPU: 13 times slower than fp32
    inputs, targets = normalize(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)), torch.arange(n) % 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if fused else None
    for _ in range(2):
        train_step(model, optimizer, inputs, targets, 0.05, autocast=autocast)
    after = model.state_dict()
    scales = [k for k in after if k.endswith("bn.weight")]
    assert scales and all(torch.equal(after[k], torch.ones_like(after[k])) for k in scales)
    assert not torch.equal(after["prep.bn.bias"], before["prep.bn.bias"])
    assert not torch.equal(after["prep.conv.weight"], before["prep.conv.weight"])
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.0, pytest.approx(0.4)]
    assert count_parameters(model) == 6_573_130
    # The seed's recipe keeps one group of every parameter, as before these settings existed.
    assert len(make_optimizer(model, Recipe(), torch.device("cpu")).param_groups) == 1


def flips_by_image(setup, order, epoch):
    draws = setup.draw_augmentation(order, epoch)
    flips = torch.empty(len(order), dtype=torch.int64)
    flips[order] = draws[:, DRAW_COLUMNS.index("flip")]
    return flips


def test_alternating_flips_mirror_each_image_every_other_epoch():
    data = Cifar10(torch.zeros(200, 3, 32, 32, dtype=torch.uint8), torch.arange(200) % 10,
                   torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10))
    recipe = Recipe(**{**TINY, "train_subset": 0, "flip_alternate": True})
    setup = setup_run(recipe, data)
    epochs = [flips_by_image(setup, setup.shuffle(), e) for e in (1, 2, 3)]
    assert 60 < int(epochs[0].sum()) < 140  # a coin per image in the first epoch
    assert torch.equal(epochs[1], 1 - epochs[0]) and torch.equal(epochs[2], epochs[0])
    again = setup_run(recipe, data)  # a resumed run's setup draws the same first coins
    assert torch.equal(flips_by_image(again, again.shuffle(), 1), epochs[0])
    # Without the setting each epoch flips by a new coin; the other columns are drawn the same either way.
    plain, alternating = setup_run(Recipe(**{**TINY, "train_subset": 0}), data), setup_run(recipe, data)
    order = plain.shuffle()
    assert torch.equal(alternating.shuffle(), order)
    a, b = plain.draw_augmentation(order, 1), alternating.draw_augmentation(order, 1)
    others = [i for i, name in enumerate(DRAW_COLUMNS) if name != "flip"]
    assert torch.equal(a[:, others], b[:, others])


def test_translated_tta_averages_the_mirror_and_two_shifts():
    torch.manual_seed(0)
    model = ResNet9().eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)

    def logits(x):
        return logits_of(model, x, "fp32", False)

    def mirrored(x):
        return (logits(x) + logits(x.flip(-1))) / 2

    assert torch.allclose(tta_logits(model, images, "fp32", False), mirrored(images))
    padded = F.pad(images.float(), (1, 1, 1, 1), mode="reflect").to(torch.uint8)
    up_left, down_right = padded[..., :32, :32], padded[..., 2:, 2:]
    assert torch.equal(up_left[..., 1:, 1:], images[..., :31, :31])  # shifted down-right by one: the image moves
    expected = mirrored(images) / 2 + mirrored(up_left) / 4 + mirrored(down_right) / 4
    with torch.no_grad():
        got = tta_logits(model, images, "fp32", False, translate=1)
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, mirrored(images), atol=1e-3)


def test_a_weight_averages_batchnorm_statistics_are_recomputed_over_training_batches():
    from cifar_onecycle.ema import refresh_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.1)).eval()
    model[1].running_mean.fill_(7.0)  # statistics that do not describe these weights
    batches = [(torch.randn(8, 3, 6, 6) * (i + 1), None) for i in range(3)]
    refresh_batchnorm(model, batches)
    with torch.no_grad():
        means = [model[0](x).mean((0, 2, 3)) for x, _ in batches]
    assert torch.allclose(model[1].running_mean, torch.stack(means).mean(0), atol=1e-5)  # the plain average
    assert not model.training and model[1].momentum == 0.1  # left as it was
    assert int(model[1].num_batches_tracked) == 3


@pytest.mark.slow
def test_a_run_evaluates_with_the_recipes_translated_tta(cifar_dir):
    from cifar_onecycle import load_cifar10, train
    from cifar_onecycle.evaluation import evaluate

    data = load_cifar10(cifar_dir, download=False)
    every = dict(tta_translate=2, bn_ghost_batch=5, bn_scale_frozen=True, bn_bias_lr_mult=4.0, flip_alternate=True,
                 ema_decay=0.9, ema_every=1)
    result = train(Recipe(**TINY, **every, ema_bn_batches=2), data=data, progress=False)
    test = data.test_images, data.test_labels
    assert result.summary["final_test_acc_tta"] == evaluate(result.model, *test, batch_size=16, tta=True,
                                                            tta_translate=2)[1]
    # The average's statistics are those of 2 training batches, not the average of the trained model's.
    averaged = train(Recipe(**TINY, **every), data=data, progress=False)
    assert not torch.equal(result.model.prep.bn.running_mean, averaged.model.prep.bn.running_mean)
    assert torch.equal(result.model.prep.conv.weight, averaged.model.prep.conv.weight)
