"""The model summary table, in the layout of the seed's (torchsummary's) table.

torchinfo walks the model with a real forward pass; this module only lays its leaf layers out the
way the seed printed them. Sizes are in MB of 2**20 bytes, as torchsummary counted: the
forward/backward size is twice the float32 size of every leaf layer's output for one image.

The receptive field table is the one a course has students fill in by hand: for each convolution
and max-pool, in the order they run, the jump (input pixels between neighbouring outputs: the
product of the strides so far) and the receptive field, r_out = r_in + (kernel - 1) x dilation x
jump_in. The layers are taken in call order, so a residual branch's convolutions count on top of the
layer it branches from: that is the deepest path, and the largest receptive field, since the Add's
skip only shortens it. A network with parallel branches that are not residual would need its graph.
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
class ReceptiveFieldRow:
    name: str            # the summary table's name of the layer, e.g. "Conv2d-1"
    kernel: int
    stride: int
    padding: int | str   # a convolution's may be "same" or "valid"
    output_size: int     # the output's height (the seed's images and maps are square)
    jump: int            # input pixels between neighbouring outputs
    receptive_field: int  # input pixels (a side) that one output sees


@dataclass(frozen=True)
class ModelSummary:
    rows: list[SummaryRow]
    total_params: int
    trainable_params: int
    input_mb: float
    forward_backward_mb: float
    params_mb: float
    receptive_fields: list[ReceptiveFieldRow]
    input_size: int      # the input's height

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

    def receptive_field_table(self) -> str:
        """A title, then a row per convolution and max-pool: kernel, stride, padding, output size,
        jump and receptive field, named as in ``table``; then where the field first covers the input."""
        header = ("Layer (type)", "kernel", "stride", "padding", "output", "jump", "receptive field")
        lines = [f"Receptive field, in pixels of the {self.input_size}x{self.input_size} input:",
                 f"{header[0]:>20}" + "".join(f"{h:>9}" for h in header[1:-1]) + f"{header[-1]:>17}"]
        for r in self.receptive_fields:
            lines.append(f"{r.name:>20}" + "".join(f"{v:>9}" for v in (r.kernel, r.stride, r.padding, r.output_size,
                                                                      r.jump)) + f"{r.receptive_field:>17}")
        covers = next((r for r in self.receptive_fields if r.receptive_field >= self.input_size), None)
        lines.append(f"The receptive field reaches the input's {self.input_size} pixels at {covers.name}; the last "
                     f"layer's is {self.receptive_fields[-1].receptive_field}." if covers else
                     f"The receptive field stays below the input's {self.input_size} pixels.")
        return "\n".join(lines)


def side(value: int | tuple[int, ...]) -> int:
    """A layer's kernel, stride, padding or dilation along the height (an int, or a tuple of them)."""
    return value if isinstance(value, int) else value[0]


def summarize(model: torch.nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> ModelSummary:
    """Run one image through ``model`` (on the CPU, in eval mode) and tabulate its leaf layers."""
    info = torchinfo.summary(model, input_size=(1, *input_size), device="cpu", verbose=0,
                             mode="eval", depth=100)
    rows: list[SummaryRow] = []
    fields: list[ReceptiveFieldRow] = []
    field, jump = 1, 1  # an input pixel sees itself
    elements = 0
    for layer in info.summary_list:
        if not layer.is_leaf_layer or not layer.executed:
            continue
        shape = tuple(layer.output_size)
        rows.append(SummaryRow(f"{layer.class_name}-{len(rows) + 1}", (-1, *shape[1:]),
                               sum(p.numel() for p in layer.module.parameters(recurse=False))))
        elements += int(torch.tensor(shape[1:]).prod())
        module = layer.module
        if isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            kernel, stride = side(module.kernel_size), side(module.stride)
            field += (kernel - 1) * side(module.dilation) * jump
            jump *= stride
            padding = module.padding if isinstance(module.padding, str) else side(module.padding)
            fields.append(ReceptiveFieldRow(rows[-1].name, kernel, stride, padding, shape[2], jump, field))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary(rows, total, trainable,
                        input_mb=4 * int(torch.tensor(input_size).prod()) / MB,
                        forward_backward_mb=2 * 4 * elements / MB,
                        params_mb=4 * total / MB, receptive_fields=fields, input_size=input_size[1])
