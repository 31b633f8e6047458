"""The seed's 3x3 convolution, and a second way to its weight gradient.

oneDNN's bf16 weight gradient of a 3x3 convolution over a 4x4 image (Layer3's residual pair: 512
channels in and out) runs at a third of its forward's speed on a CPU with AMX. The same gradient is
one matrix product, the output gradient's (images x pixels, out channels) against the input's 3x3
patches (images x pixels, 9 x in channels), which AMX runs fast. Measured on 2 cores of an Intel
Xeon with AMX at batch 512 (``benchmarks/conv_weight_grad.py``, benchmarks/results/README.md,
"The weight gradient as a matrix product"): 512 to 512 channels at 4x4, oneDNN 148 ms, the product
56 ms with its patches; at 8x8 (256 to 512) the product lost, 143 ms against 107 ms. Without AMX
(oneDNN held to AVX512-BF16), or in fp32, the product lost at every size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

# The largest image (in pixels, height x width) whose weight gradient goes through the matrix
# product: 4x4 gained, 8x8 lost (see above).
MATMUL_WEIGHT_GRAD_PIXELS = 16


def patches(x: torch.Tensor) -> torch.Tensor:
    """The 3x3 patches (zero padding 1) of ``x`` (N, C, H, W): (N x H x W, 9 x C), a row per
    output pixel, columns ordered kernel row, kernel column, channel. A copy 9 times the size of
    ``x`` (75 MB in bf16 for Layer3's 512 channels at batch 512)."""
    n, c, h, w = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # N, H+2, W+2, C: channels_last's own order
    shifted = [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
    return torch.stack(shifted, dim=3).reshape(n * h * w, 9 * c)


def matmul_weight_grad(x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The weight gradient (C_out, C_in, 3, 3) of a 3x3 convolution (stride 1, padding 1) of ``x``
    whose output has the gradient ``grad_out``, as one matrix product in their dtype."""
    n, c_out, h, w = grad_out.shape
    rows = grad_out.permute(0, 2, 3, 1).reshape(n * h * w, c_out)
    return (rows.t() @ patches(x)).view(c_out, 3, 3, x.shape[1]).permute(0, 3, 1, 2)


class MatmulWeightGrad(torch.autograd.Function):
    """A 3x3 convolution, stride 1, padding 1, no bias: forward and input gradient by torch's own
    kernels, the weight gradient by ``grad_out^T @ patches(x)``, in the inputs' dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, padding=1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(x.shape, weight, grad_out, padding=1)
        if ctx.needs_input_grad[1]:
            grad_weight = matmul_weight_grad(x, grad_out)
        return grad_x, grad_weight


class Conv2d(nn.Conv2d):
    """The seed's convolution: 3x3, stride 1, padding 1, no bias. Named as torch's (the summary
    table shows its class name). With ``weight_grad_by_matmul`` on (``device.matmul_weight_grad_pays``
    says where), a training forward over images of at most ``MATMUL_WEIGHT_GRAD_PIXELS`` pixels
    takes its weight gradient from ``MatmulWeightGrad``; everything else is ``nn.Conv2d``'s."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.weight_grad_by_matmul = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.weight_grad_by_matmul and x.shape[-2] * x.shape[-1] <= MATMUL_WEIGHT_GRAD_PIXELS
                and torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        weight = self.weight
        device = x.device.type
        # autocast's casts, made here: the backward runs outside autocast and computes in the
        # dtype of what the forward saved
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(device, enabled=False):
            return MatmulWeightGrad.apply(x, weight)
