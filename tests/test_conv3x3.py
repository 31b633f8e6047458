"""The convolutions' weight gradient on small images as a matrix product (``conv3x3``): the same
gradient as torch's, taken only where it is switched on and the image is small, in autocast's
arithmetic, and switched on by a run only in bf16 on a CPU with AMX."""
import pytest
import torch

from cifar_onecycle import Cifar10, Recipe
from cifar_onecycle.conv3x3 import MATMUL_WEIGHT_GRAD_PIXELS, Conv2d, MatmulWeightGrad, matmul_weight_grad
from cifar_onecycle.device import cpu_has_amx, matmul_weight_grad_pays
from cifar_onecycle.run_setup import setup_run
from test_train import TINY


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 4, 3, 5), (2, 3, 1, 1)])
def test_the_product_is_torchs_weight_gradient(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    grad_out = torch.randn(shape[0], 6, *shape[2:], dtype=torch.float64, generator=g)
    expected = torch.nn.grad.conv2d_weight(x, (6, shape[1], 3, 3), grad_out, padding=1)
    assert torch.allclose(matmul_weight_grad(x, grad_out), expected, rtol=1e-12, atol=1e-12)
    as_channels_last = matmul_weight_grad(x.contiguous(memory_format=torch.channels_last),
                                          grad_out.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(as_channels_last, expected, rtol=1e-12, atol=1e-12)


def gradients(model, images, on, autocast):
    model.zero_grad()
    model.set_weight_grad_by_matmul(on)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(images)
    out.float().square().sum().backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_a_switched_network_trains_with_the_same_gradients_in_fp64(monkeypatch):
    torch.manual_seed(0)
    model = Recipe().model().double().to(memory_format=torch.channels_last)
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out_off, off = gradients(model, images, False, autocast=False)
    out_on, on = gradients(model, images, True, autocast=False)
    assert torch.equal(out_on, out_off)
    for name in off:
        assert torch.allclose(on[name], off[name], rtol=1e-10, atol=1e-12), name
    # Only the layers on small images take the product: Layer3's residual pair (4x4), not Layer3's
    # first convolution (8x8 before its pool).
    taken = []
    for conv in (model.layer3.x.conv, model.layer3.r1.conv, model.layer3.r2.conv):
        conv.register_forward_hook(lambda m, i, o: taken.append((i[0].shape[-1], type(o.grad_fn).__name__)))
    model(images)
    assert [side for side, _ in taken] == [8, 4, 4] and 4 * 4 <= MATMUL_WEIGHT_GRAD_PIXELS < 8 * 8
    assert [fn for _, fn in taken] == ["ConvolutionBackward0", "MatmulWeightGradBackward", "MatmulWeightGradBackward"]
    # Without a graph to take a gradient through (evaluation), torch's convolution.
    applied = []
    apply = MatmulWeightGrad.apply
    monkeypatch.setattr(MatmulWeightGrad, "apply", lambda *args: applied.append(1) or apply(*args))
    model(images)
    assert len(applied) == 2
    applied.clear()
    with torch.no_grad():
        model(images)
    assert applied == []


def test_under_autocast_the_product_computes_in_bf16_as_torchs_would():
    torch.manual_seed(0)
    model = Recipe().model().to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out_off, off = gradients(model, images, False, autocast=True)
    out_on, on = gradients(model, images, True, autocast=True)
    assert out_on.dtype == torch.bfloat16 and torch.equal(out_on, out_off)
    for name in off:
        assert on[name].dtype == torch.float32
        # bf16's rounding of a differently ordered sum: a few parts in a thousand of the largest entry
        scale = off[name].abs().max()
        assert (on[name] - off[name]).abs().max() <= 1e-2 * scale, name
    assert not torch.equal(on["layer3.r1.conv.weight"], off["layer3.r1.conv.weight"])  # the product did run


def test_the_switch_is_on_only_for_bf16_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    cpu = torch.device("cpu")
    assert matmul_weight_grad_pays(cpu, "bf16")
    assert not matmul_weight_grad_pays(cpu, "fp32")
    assert not matmul_weight_grad_pays(torch.device("cuda"), "bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # oneDNN held below AMX
    assert not cpu_has_amx()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_has_amx()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not matmul_weight_grad_pays(cpu, "bf16")


@pytest.mark.parametrize("amx", [True, False])
def test_a_run_switches_its_network_by_the_policy(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    data = Cifar10(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.arange(40) % 10,
                   torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10))
    for precision, expected in (("bf16", amx), ("fp32", False)):
        model = setup_run(Recipe(**{**TINY, "precision": precision}), data).model
        switches = [m.weight_grad_by_matmul for m in model.modules() if isinstance(m, Conv2d)]
        assert len(switches) == 8 and all(s == expected for s in switches), precision
