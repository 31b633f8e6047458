"""The convolutions on small images as matrix products (``conv3x3``): torch's convolution and
gradients, taken only where switched on and the image is small, in autocast's arithmetic, and
switched on by a run only in bf16 on a CPU with AMX."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from cifar_onecycle import Cifar10, Recipe, conv3x3
from cifar_onecycle.conv3x3 import (
    MATMUL_FORWARD_ROWS,
    MATMUL_PIXELS,
    Conv2d,
    MatmulConv,
    matmul_conv,
    matmul_input_grad,
    matmul_weight_grad,
    patches,
)
from cifar_onecycle.device import conv_by_matmul_pays, cpu_has_amx
from cifar_onecycle.run_setup import setup_run
from test_train import TINY


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (2, 4, 3, 5), (2, 3, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_products_are_torchs_convolution_and_gradients(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape, dtype=torch.float64, generator=g).contiguous(memory_format=layout)
    weight = torch.randn(6, shape[1], 3, 3, dtype=torch.float64, generator=g)
    grad_out = torch.randn(shape[0], 6, *shape[2:], dtype=torch.float64, generator=g).contiguous(memory_format=layout)
    close = dict(rtol=1e-12, atol=1e-12)
    assert torch.allclose(matmul_conv(x, weight), F.conv2d(x, weight, padding=1), **close)
    assert torch.allclose(matmul_input_grad(grad_out, weight),
                          conv2d_input(x.shape, weight, grad_out, padding=1), **close)
    assert torch.allclose(matmul_weight_grad(patches(x), grad_out, shape[1]),
                          conv2d_weight(x, weight.shape, grad_out, padding=1), **close)


@pytest.mark.parametrize("forward_too", [False, True])
def test_the_function_passes_gradcheck_and_skips_a_gradient_not_asked_for(monkeypatch, forward_too):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(MatmulConv.apply, (x, weight, forward_too))
    computed = []
    for name in ("conv2d_input", "matmul_input_grad", "matmul_weight_grad"):
        work = getattr(conv3x3, name)
        monkeypatch.setattr(conv3x3, name, lambda *args, work=work, name=name, **kw: computed.append(name)
                            or work(*args, **kw))
    MatmulConv.apply(x, weight.detach(), forward_too).sum().backward()  # a frozen weight
    MatmulConv.apply(x.detach(), weight, forward_too).sum().backward()  # an input that needs no gradient
    assert computed == ["matmul_input_grad" if forward_too else "conv2d_input", "matmul_weight_grad"]


def test_the_forward_is_a_product_too_from_its_threshold_of_rows(monkeypatch):
    conv = Conv2d(2, 3)
    conv.by_matmul = True
    taken = []
    apply = MatmulConv.apply
    monkeypatch.setattr(MatmulConv, "apply", lambda *args: taken.append(args[2]) or apply(*args))
    images = MATMUL_FORWARD_ROWS // 16
    for n in (images - 1, images):
        conv(torch.randn(n, 2, 4, 4))
    assert taken == [False, True]


def gradients(model, images, on, autocast):
    model.zero_grad()
    model.set_conv_by_matmul(on)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(images)
    out.float().square().sum().backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("forward_too", [False, True])
def test_a_switched_network_trains_with_the_same_outputs_and_gradients_in_fp64(monkeypatch, forward_too):
    monkeypatch.setattr(conv3x3, "MATMUL_FORWARD_ROWS", 0 if forward_too else 10**9)
    torch.manual_seed(0)
    model = Recipe().model().double().to(memory_format=torch.channels_last)
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out_off, off = gradients(model, images, False, autocast=False)
    out_on, on = gradients(model, images, True, autocast=False)
    assert torch.allclose(out_on, out_off, rtol=1e-10, atol=1e-12)
    for name in off:
        assert torch.allclose(on[name], off[name], rtol=1e-10, atol=1e-12), name
    # Only the layers on small images take the products: Layer3's residual pair (4x4), not Layer3's
    # first convolution (8x8 before its pool).
    taken = []
    for conv in (model.layer3.x.conv, model.layer3.r1.conv, model.layer3.r2.conv):
        conv.register_forward_hook(lambda m, i, o: taken.append((i[0].shape[-1], type(o.grad_fn).__name__)))
    model(images)
    assert [side for side, _ in taken] == [8, 4, 4] and 4 * 4 <= MATMUL_PIXELS < 8 * 8
    assert [fn for _, fn in taken] == ["ConvolutionBackward0", "MatmulConvBackward", "MatmulConvBackward"]
    # Evaluation (no graph) takes them too, and switched off, none does.
    applied = []
    apply = MatmulConv.apply
    monkeypatch.setattr(MatmulConv, "apply", lambda *args: applied.append(args[2]) or apply(*args))
    with torch.no_grad():
        model(images)
    assert applied == [forward_too, forward_too]
    applied.clear()
    model.set_conv_by_matmul(False)
    model(images)
    assert applied == []


@pytest.mark.parametrize("forward_too", [False, True])
def test_under_autocast_a_layer_computes_in_bf16_as_torchs_would(monkeypatch, forward_too):
    monkeypatch.setattr(conv3x3, "MATMUL_FORWARD_ROWS", 0 if forward_too else 10**9)
    g = torch.Generator().manual_seed(0)
    conv = Conv2d(64, 32)
    conv.by_matmul = True
    x = torch.randn(8, 64, 4, 4, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.randn(8, 32, 4, 4, generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        out = conv(x)
    out.backward(grad_out)
    # exactly the products (or torch's kernels) on autocast's bf16 casts; the gradients back in
    # fp32 as torch's casts give them
    xb, wb, gb = x.detach().bfloat16(), conv.weight.detach().bfloat16(), grad_out.bfloat16()
    expected_out = matmul_conv(xb, wb) if forward_too else F.conv2d(xb, wb, padding=1)
    expected_x_grad = matmul_input_grad(gb, wb) if forward_too else conv2d_input(xb.shape, wb, gb, padding=1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected_out)
    assert conv.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.equal(conv.weight.grad, matmul_weight_grad(patches(xb), gb, 64).float())
    assert torch.equal(x.grad, expected_x_grad.float())
    # and within bf16's rounding of torch's own bf16 convolution and gradients
    reference = x.detach().clone().requires_grad_()
    weight = conv.weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        torch_out = F.conv2d(reference, weight, padding=1)
    torch_out.backward(grad_out)
    for ours, torchs in ((out, torch_out), (x.grad, reference.grad), (conv.weight.grad, weight.grad)):
        assert (ours.float() - torchs.float()).abs().max() <= 1e-2 * torchs.float().abs().max()


def test_under_autocast_a_switched_network_runs_the_products_in_bf16():
    torch.manual_seed(0)
    model = Recipe().model().to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out_off, off = gradients(model, images, False, autocast=True)
    out_on, on = gradients(model, images, True, autocast=True)
    assert out_on.dtype == torch.bfloat16
    assert (out_on.float() - out_off.float()).abs().max() <= 2e-2 * out_off.float().abs().max()
    # A network's gradients at initialisation are too ill-conditioned in bf16 to compare entry by
    # entry (torch's own bf16 ones differ from fp32's by a third of their largest entry): the
    # arithmetic is checked layer by layer above.
    assert all(on[name].dtype == torch.float32 and on[name].isfinite().all() for name in on)
    assert not torch.equal(on["layer3.r1.conv.weight"], off["layer3.r1.conv.weight"])  # the products did run


def test_the_switch_is_on_only_for_bf16_on_a_cpu_with_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    cpu = torch.device("cpu")
    assert conv_by_matmul_pays(cpu, "bf16")
    assert not conv_by_matmul_pays(cpu, "fp32")
    assert not conv_by_matmul_pays(torch.device("cuda"), "bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # oneDNN held below AMX
    assert not cpu_has_amx()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_has_amx()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not conv_by_matmul_pays(cpu, "bf16")


def test_a_torch_without_the_amx_probe_reads_linux_list_of_cpu_features(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)  # as in torch 2.4
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr("cifar_onecycle.device.CPUINFO", info)
    assert not cpu_has_amx()  # nothing to read: macOS, Windows
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_has_amx() and conv_by_matmul_pays(torch.device("cpu"), "bf16")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not cpu_has_amx()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert not cpu_has_amx()


@pytest.mark.parametrize("amx", [True, False])
def test_a_run_switches_its_network_by_the_policy(monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    data = Cifar10(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.arange(40) % 10,
                   torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10))
    for precision, expected in (("bf16", amx), ("fp32", False)):
        model = setup_run(Recipe(**{**TINY, "precision": precision}), data).model
        switches = [m.by_matmul for m in model.modules() if isinstance(m, Conv2d)]
        assert len(switches) == 8 and all(s == expected for s in switches), precision
