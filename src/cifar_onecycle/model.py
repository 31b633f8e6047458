"""The seed's custom ResNet (EVA6 Session 9): 6,573,130 parameters.

Activations are functional (``F.relu``) on purpose: the seed's summary table has no ReLU rows, and
keeping them out of the module tree lets the summary walk reproduce that table row for row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conv3x3 import Conv2d


class ConvBN(nn.Module):
    """Conv 3x3 (stride 1, padding 1, no bias), an optional 2x2 max-pool, BatchNorm, then ReLU."""

    def __init__(self, c_in: int, c_out: int, pool: bool = False, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv = Conv2d(c_in, c_out)
        self.pool = nn.MaxPool2d(2) if pool else None
        self.bn = nn.BatchNorm2d(c_out, momentum=bn_momentum)
        self.ghost_batch = 0  # a setting, not a layer: the summary table stays the seed's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.pool is not None:
            x = self.pool(x)
        return F.relu(ghost_batch_norm(self.bn, x, self.ghost_batch))


def ghost_batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor, size: int) -> torch.Tensor:
    """``bn`` in training with its statistics over consecutive groups of ``size`` images ("ghost"
    batches, as one process of a data-parallel run sees its share of each batch), each group
    normalised by its own; the running statistics move towards the groups' mean statistics once a
    step. In evaluation, or with ``size`` 0 or not below the batch, plain ``bn``. The groups are
    laid side by side as channels for one ``batch_norm`` call: a copy of the activations each way."""
    n, c, h, w = x.shape
    groups = n // size if size else 1
    if not bn.training or groups <= 1:
        return bn(x)
    if n % size:
        raise ValueError(f"ghost batch norm: {n} images are not whole groups of {size}")
    assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None
    grouped = x.reshape(groups, size, c, h, w).transpose(0, 1).reshape(size, groups * c, h, w)
    mean, var = bn.running_mean.repeat(groups), bn.running_var.repeat(groups)
    weight = bn.weight.repeat(groups) if bn.weight is not None else None
    bias = bn.bias.repeat(groups) if bn.bias is not None else None
    # momentum None: a cumulative average, as BatchNorm keeps it (the weight average's statistics)
    rate = 1.0 / (int(bn.num_batches_tracked) + 1) if bn.momentum is None else bn.momentum
    out = F.batch_norm(grouped, mean, var, weight, bias, True, rate, bn.eps)
    with torch.no_grad():
        bn.running_mean.copy_(mean.view(groups, c).mean(0))
        bn.running_var.copy_(var.view(groups, c).mean(0))
        bn.num_batches_tracked += 1
    return out.reshape(size, groups, c, h, w).transpose(0, 1).reshape(n, c, h, w)


class Residual(nn.Module):
    """X = ConvBN(pool)(x); R = (ConvBN, ConvBN)(X); return X + R."""

    def __init__(self, c_in: int, c_out: int, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.x = ConvBN(c_in, c_out, pool=True, bn_momentum=bn_momentum)
        self.r1 = ConvBN(c_out, c_out, bn_momentum=bn_momentum)
        self.r2 = ConvBN(c_out, c_out, bn_momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.x(x)
        return x + self.r2(self.r1(x))


class ResNet9(nn.Module):
    """PrepLayer 64 - Layer1 128 (+res) - Layer2 256 - Layer3 512 (+res) - MaxPool 4 - FC 10.

    ``logit_scale`` multiplies the logits (the DAWNBench ResNet uses 0.125); it is a constant, not a
    parameter, so the count stays at 6,573,130. ``ghost_batch``: BatchNorm statistics over groups of
    that many images in training (``ghost_batch_norm``; 0: the whole batch). The forward returns
    logits: the seed's softmax lives in the cross-entropy loss.
    """

    def __init__(self, num_classes: int = 10, logit_scale: float = 1.0, bn_momentum: float = 0.1,
                 ghost_batch: int = 0) -> None:
        super().__init__()
        self.prep = ConvBN(3, 64, bn_momentum=bn_momentum)
        self.layer1 = Residual(64, 128, bn_momentum=bn_momentum)
        self.layer2 = ConvBN(128, 256, pool=True, bn_momentum=bn_momentum)
        self.layer3 = Residual(256, 512, bn_momentum=bn_momentum)
        self.pool = nn.MaxPool2d(4)
        self.fc = nn.Linear(512, num_classes)
        self.logit_scale = logit_scale
        for layer in self.modules():
            if isinstance(layer, ConvBN):
                layer.ghost_batch = ghost_batch

    def set_conv_by_matmul(self, on: bool) -> None:
        """Switch the convolutions on small images (Layer3's residual pair) to matrix products
        (``conv3x3.Conv2d``; ``device.conv_by_matmul_pays`` says where they are faster)."""
        for layer in self.modules():
            if isinstance(layer, Conv2d):
                layer.by_matmul = on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        x = self.fc(torch.flatten(self.pool(x), 1))
        return x * self.logit_scale if self.logit_scale != 1.0 else x


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# A training step costs about three forward passes: the forward, and a backward that computes the
# gradients of both the activations and the weights (each as large as the forward).
TRAIN_FLOPS_PER_FORWARD = 3


@torch.no_grad()
def training_flops_per_image(model: nn.Module, image_size: int = 32) -> float:
    """The FLOPs one image costs a training step: the multiply-adds of the convolutions and linear
    layers (the rest is memory-bound and small), x2 for FLOPs, x ``TRAIN_FLOPS_PER_FORWARD``. Counted
    on a forward pass of one image in eval mode (no BatchNorm statistics change); the model is left
    in the mode it was in."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output[0].numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    was_training = model.training
    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        parameter = next(model.parameters())
        model.eval()(torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return 2.0 * total * TRAIN_FLOPS_PER_FORWARD
