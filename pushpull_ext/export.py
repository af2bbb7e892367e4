"""Export of push-pull layers to graphs of standard operators: ONNX, and plain-op torch.export programs.

The fused forward ops (`pushpull::forward`, and `pushpull::triton_forward` where Triton loads) are
given a decomposition into plain PyTorch ops: `reference.op_formula`, the formula the kernels are
tested against (two convolutions, ReLUs, average pooling, a multiply and adds). It is registered,
at package import, in torch's decomposition table (`torch._decomp.register_decomposition`).

Why there: `torch.onnx.export(model, args, dynamo=True)` runs torch.export, then decomposes every
op that has no ONNX translation with `torch.export.default_decompositions()` together with
`torch._decomp.decomposition_table` (torch/onnx/_internal/exporter/_decomp.py), then translates the
standard ops. So a converted model exports with no argument from the user, as one with
nn.Conv2d does. The alternatives need one: an onnxscript function passed as
`custom_translation_table=` at every export call (torch has no public registry that the default
export reads), or a decomposition table passed to `ExportedProgram.run_decompositions`. Being a
decomposition, it also writes the formula once, in `op_formula`, not again in onnxscript.

torch.export itself is unchanged: the decomposition is not in `default_decompositions()`, so
`torch.export.export(model, args)` and its default `run_decompositions()` keep each push-pull
layer as one `pushpull` node (for runtimes that load this extension). For a program of plain ops
only, pass `decomposition_table()`: `program.run_decompositions(decomposition_table())`.

Limits: the decomposition computes the layer's output, the second output of the ops (the packed
ReLU masks that only their backward reads) is an empty uint8 tensor: exported graphs are for
inference, and any graph that read the masks would fail on that empty tensor, never get wrong bits.
"""

from __future__ import annotations

import torch
import torch._decomp

from . import ops  # (importing it defines the Triton ops, where Triton loads)
from .reference import op_formula


def _forward_decomposition(*args):
    """The fused forward op in plain ops: (output, empty uint8 masks); see the module docstring."""
    forward = ops.ForwardArgs(*args)
    out = op_formula(*forward[:-1])  # all but save_masks
    return out, forward.input.new_empty((0,), dtype=torch.uint8)


def fused_forward_ops() -> list:
    """The forward op overloads this process has: pushpull::forward (the C++ extension is loaded) and
    pushpull::triton_forward (Triton loaded)."""
    names = [name for name in ("forward", "triton_forward") if hasattr(torch.ops.pushpull, name)]
    return [getattr(torch.ops.pushpull, name).default for name in names]


def decomposition_table() -> dict:
    """{forward op: its decomposition into plain ops}, for ExportedProgram.run_decompositions."""
    return {op: _forward_decomposition for op in fused_forward_ops()}


def _register() -> None:
    for op in fused_forward_ops():
        if op not in torch._decomp.decomposition_table:  # a second import (importlib.reload) registers nothing
            torch._decomp.register_decomposition(op)(_forward_decomposition)


_register()
