"""The training step: the one place where forward, loss, backward and the SGD update happen.

The training loop, the LR range test and the benchmarks all call ``train_step``, so that what the
range test and the benchmarks measure is what training does (loss scaling included).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from .recipe import Recipe

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
               targets: torch.Tensor, lr: float, *, momentum: float | None = None,
               scaler: torch.amp.GradScaler | None = None,
               autocast: Callable[[], AbstractContextManager] | None = None,
               loss_fn: LossFunction = F.cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """One step at ``lr`` (and SGD ``momentum``, when it cycles; else the optimizer's): forward
    (under ``autocast()``), loss in fp32, backward (through the ``scaler``'s loss scaling: fp16
    needs it, an off scaler is a no-op), update.

    Returns the loss and the logits, detached and still on the device: reading them is the
    caller's choice of when to pay for a host sync."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        if momentum is not None:
            group["momentum"] = momentum
    with autocast() if autocast else contextlib.nullcontext():
        logits = model(inputs)
        loss = loss_fn(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach(), logits.detach()


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device,
                   fused: bool | None = None) -> torch.optim.SGD:
    """The recipe's SGD. ``fused`` (default: on CUDA) updates every parameter in one kernel instead
    of a few per parameter group: fewer launches for a step that takes milliseconds on a GPU
    (benchmarks/results/README.md, the defaults). The CPU uses the for-each implementation, whose
    results the bit-identical resume tests pin."""
    use_fused = device.type == "cuda" if fused is None else fused
    return torch.optim.SGD(parameter_groups(model, recipe), lr=recipe.lr_min, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay, fused=use_fused or None)


def parameter_groups(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """The optimizer's parameter groups: one, unless the recipe treats BatchNorm's parameters
    apart. Frozen scales sit in a group whose LR multiplier and weight decay are 0, so SGD never
    moves them from 1 (they stay parameters: the count and the summary are the seed's); the biases'
    group has the recipe's LR multiplier (``train_step`` applies ``lr_mult``)."""
    if not recipe.bn_scale_frozen and recipe.bn_bias_lr_mult == 1.0:
        return [{"params": list(model.parameters())}]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    scales = {id(m.weight) for m in norms}
    biases = {id(m.bias) for m in norms}
    rest = [p for p in model.parameters() if id(p) not in scales | biases]
    return [{"params": rest},
            {"params": [m.weight for m in norms], **({"lr_mult": 0.0, "weight_decay": 0.0}
                                                    if recipe.bn_scale_frozen else {})},
            {"params": [m.bias for m in norms], "lr_mult": recipe.bn_bias_lr_mult}]


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its gradients underflow without it); a no-op scaler otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
