"""The model summary table, in the layout of the seed's (torchsummary's) table.

torchinfo walks the model with a real forward pass; this module only lays its leaf layers out the
way the seed printed them. Sizes are in MB of 2**20 bytes, as torchsummary counted: the
forward/backward size is twice the float32 size of every leaf layer's output for one image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torchinfo

MB = 2.0**20


@dataclass(frozen=True)
class SummaryRow:
    name: str            # e.g. "Conv2d-1"
    output_shape: tuple[int, ...]  # with -1 for the batch dimension
    params: int


@dataclass(frozen=True)
class ModelSummary:
    rows: list[SummaryRow]
    total_params: int
    trainable_params: int
    input_mb: float
    forward_backward_mb: float
    params_mb: float

    @property
    def total_mb(self) -> float:
        return self.input_mb + self.forward_backward_mb + self.params_mb

    def table(self) -> str:
        """The seed's table, line for line."""
        rule, double = "-" * 64, "=" * 64
        lines = [rule, f"{'Layer (type)':>20}  {'Output Shape':>25} {'Param #':>15}", double]
        for r in self.rows:
            shape = "[" + ", ".join(str(d) for d in r.output_shape) + "]"
            lines.append(f"{r.name:>20}  {shape:>25} {r.params:>15,}")
        lines += [double,
                  f"Total params: {self.total_params:,}",
                  f"Trainable params: {self.trainable_params:,}",
                  f"Non-trainable params: {self.total_params - self.trainable_params:,}",
                  rule,
                  f"Input size (MB): {self.input_mb:.2f}",
                  f"Forward/backward pass size (MB): {self.forward_backward_mb:.2f}",
                  f"Params size (MB): {self.params_mb:.2f}",
                  f"Estimated Total Size (MB): {self.total_mb:.2f}",
                  rule]
        return "\n".join(lines)


def summarize(model: torch.nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> ModelSummary:
    """Run one image through ``model`` (on the CPU, in eval mode) and tabulate its leaf layers."""
    info = torchinfo.summary(model, input_size=(1, *input_size), device="cpu", verbose=0,
                             mode="eval", depth=100)
    rows: list[SummaryRow] = []
    elements = 0
    for layer in info.summary_list:
        if not layer.is_leaf_layer or not layer.executed:
            continue
        shape = tuple(layer.output_size)
        rows.append(SummaryRow(f"{layer.class_name}-{len(rows) + 1}", (-1, *shape[1:]),
                               sum(p.numel() for p in layer.module.parameters(recurse=False))))
        elements += int(torch.tensor(shape[1:]).prod())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(rows, total, trainable,
                        input_mb=4 * int(torch.tensor(input_size).prod()) / MB,
                        forward_backward_mb=2 * 4 * elements / MB,
                        params_mb=4 * total / MB)
