"""The seed's 3x3 convolution, and a second way to compute it on small images: matrix products.

A 3x3 convolution (stride 1, padding 1) is one matrix product of the input's 3x3 patches (a row per
output pixel, 9 x C_in columns) with the weight as a (C_out, 9 x C_in) matrix; its weight gradient
is the output gradient's rows against the same patches, and its input gradient the output
gradient's patches against the weight turned half a turn, in and out channels swapped. On a CPU
with AMX, in bf16, oneDNN's kernels run Layer3's residual pair (512 channels in and out over 4x4
images) far below AMX's speed: its weight gradient at a third of its forward's. Measured on 2 cores
of an Intel Xeon with AMX, freed memory kept as a run keeps it (``benchmarks/conv_by_matmul.py``;
benchmarks/results/README.md, "Convolutions on small images as matrix products"): at batch 512
such a layer's forward and backward took 101 ms as products against 254 ms by oneDNN, and runs 1.30
times as fast; at 8x8 (256 to 512 channels) the layer lost (238 against 204 ms: its weight
gradient gained, its forward and input gradient lost more), so products stop at 4x4. Below 128
images the forward and input gradient lost to oneDNN's (batch 64: the layer 30 ms against 22 with
only its weight gradient a product; batch 128: 37 against 43), so small batches take the weight
gradient alone. Without AMX (oneDNN held to AVX512-BF16) the products lost (the layer 646
against 522 ms, runs 0.96 times as fast); in fp32 the weight gradient's product did (the others
not measured).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

# The largest image (in pixels, height x width) whose convolution runs as matrix products: 4x4
# gained, 8x8 did not (see above).
MATMUL_PIXELS = 16
# The fewest output rows (images x pixels) at which the forward and the input gradient run as
# products too, not only the weight gradient: 128 images of 4x4 gained, 64 lost (see above).
MATMUL_FORWARD_ROWS = 128 * 16


def patches(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 patches (zero padding 1) of ``x`` (N, C, H, W): (N x H x W, 9 x C), a row per
    output pixel, columns ordered kernel row, kernel column, channel. A copy 9 times the size of
    ``x`` (75 MB in bf16 for Layer3's 512 channels at batch 512), one strided copy from a padded
    channels_last view."""
    n, c, h, w = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # N, H+2, W+2, C: channels_last's own order
    windows = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # N, H, W, C, 3, 3 (a view)
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(n * h * w, 9 * c)


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The weight (C_out, C_in, 3, 3) as (C_out, 9 x C_in), columns in ``patches``' order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def as_image(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N x H x W, C) rows as an (N, C, H, W) image of ``like``'s size, channels_last (a view)."""
    n, _, h, w = like.shape
    return rows.view(n, h, w, -1).permute(0, 3, 1, 2)


def matmul_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=1)`` as one product, in their dtype."""
    return as_image(patches(x) @ weight_matrix(weight).t(), x)


def matmul_input_grad(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input gradient of a 3x3 convolution (stride 1, padding 1) by ``weight`` whose output has
    the gradient ``grad_out``: the convolution of ``grad_out`` by the weight turned half a turn in
    its 3x3 plane, its in and out channels swapped."""
    return matmul_conv(grad_out, weight.flip(2, 3).transpose(0, 1))


def matmul_weight_grad(x_patches: torch.Tensor, grad_out: torch.Tensor, c_in: int) -> torch.Tensor:
    """The weight gradient (C_out, C_in, 3, 3) of a 3x3 convolution (stride 1, padding 1) of an
    input with ``patches`` ``x_patches`` whose output has the gradient ``grad_out``."""
    c_out = grad_out.shape[1]
    rows = grad_out.permute(0, 2, 3, 1).reshape(-1, c_out)
    return (rows.t() @ x_patches).view(c_out, 3, 3, c_in).permute(0, 3, 1, 2)


class MatmulConv(torch.autograd.Function):
    """A 3x3 convolution, stride 1, padding 1, no bias, its weight gradient a matrix product in the
    inputs' dtype. With ``forward_too``, the forward and the input gradient are products too and
    the input's patches are kept for the weight gradient, not the input (9 times its memory through
    the backward pass, one copy fewer); without, they are torch's own kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, forward_too: bool) -> torch.Tensor:
        ctx.forward_too, ctx.c_in = forward_too, x.shape[1]
        if not forward_too:
            ctx.save_for_backward(x, weight)
            return F.conv2d(x, weight, padding=1)
        x_patches = patches(x)
        ctx.save_for_backward(x_patches, weight)
        return as_image(x_patches @ weight_matrix(weight).t(), x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        saved, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (matmul_input_grad(grad_out, weight) if ctx.forward_too
                      else conv2d_input(saved.shape, weight, grad_out, padding=1))
        if ctx.needs_input_grad[1]:
            x_patches = saved if ctx.forward_too else patches(saved)
            grad_weight = matmul_weight_grad(x_patches, grad_out, ctx.c_in)
        return grad_x, grad_weight, None


class Conv2d(nn.Conv2d):
    """The seed's convolution: 3x3, stride 1, padding 1, no bias. Named as torch's (the summary
    table shows its class name). With ``by_matmul`` on (``device.conv_by_matmul_pays`` says where),
    a forward over images of at most ``MATMUL_PIXELS`` pixels runs as ``MatmulConv``, wholly by
    products from ``MATMUL_FORWARD_ROWS`` output rows up; everything else is ``nn.Conv2d``'s."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.by_matmul = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.by_matmul and x.shape[-2] * x.shape[-1] <= MATMUL_PIXELS):
            return super().forward(x)
        forward_too = x.shape[0] * x.shape[-2] * x.shape[-1] >= MATMUL_FORWARD_ROWS
        weight = self.weight
        device = x.device.type
        # autocast's casts, made here: the backward runs outside autocast and computes in the
        # dtype of what the forward saved
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(device, enabled=False):
            return MatmulConv.apply(x, weight, forward_too)
