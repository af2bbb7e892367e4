"""Export of push-pull layers to graphs of standard operators: ONNX, and plain-op torch.export programs.

The fused forward ops (`pushpull::forward`, and `pushpull::triton_forward` where Triton loads) have a
decomposition into plain PyTorch ops: `reference.op_formula`, the formula the kernels are tested against
(two convolutions, ReLUs, average pooling, a multiply and adds). `decomposition_table()` gives it to
`ExportedProgram.run_decompositions`, and `to_onnx` exports a model through it:

    onnx_program = pushpull_ext.export.to_onnx(model, (x,))   # then onnx_program.save("model.onnx")

Why a function of ours rather than plain `torch.onnx.export(model, ...)`: the exporter would need the
decomposition in torch's global decomposition table, and there Inductor takes it for a conflict with
the op's fallback (`make_fallback(...): a decomposition exists`, an error whenever the environment
variable CI is set), so torch.compile of the same model would fail. An onnxscript translation passed as
`custom_translation_table=` would write the formula a second time. So `to_onnx` runs torch.export, the
decomposition, then `torch.onnx.export` of the resulting program.

torch.export itself is unchanged: `torch.export.export(model, args)` and its default
`run_decompositions()` keep each push-pull layer as one `pushpull` node (for runtimes that load this
extension).

Limits: the decomposition computes the layer's output, the second output of the ops (the packed ReLU
masks that only their backward reads) is an empty uint8 tensor: exported graphs are for inference, and
any graph that read the masks would fail on that empty tensor, never get wrong bits. A plain
`torch.onnx.export(model, ...)` of a model with push-pull layers fails with the exporter's
"no ONNX translation" error for `pushpull::forward`: it never exports something wrong.
"""

from __future__ import annotations

import torch

from . import ops  # (importing it defines the Triton ops, where Triton loads)
from .reference import op_formula


def _forward_decomposition(*args):
    """The fused forward op in plain ops: (output, empty uint8 masks); see the module docstring."""
    forward = ops.ForwardArgs(*args)
    out = op_formula(*forward.formula_args())
    return out, forward.input.new_empty((0,), dtype=torch.uint8)


def fused_forward_ops() -> list:
    """The forward op overloads this process has: pushpull::forward (the C++ extension is loaded) and
    pushpull::triton_forward (Triton loaded)."""
    names = [name for name in ("forward", "triton_forward") if hasattr(torch.ops.pushpull, name)]
    return [getattr(torch.ops.pushpull, name).default for name in names]


def decomposition_table() -> dict:
    """{forward op: its decomposition into plain ops}, for ExportedProgram.run_decompositions."""
    return {op: _forward_decomposition for op in fused_forward_ops()}


def to_onnx(model: torch.nn.Module, args: tuple, *, dynamic_shapes=None, **onnx_options):
    """torch.onnx.export of `model` (its push-pull layers as standard operators): torch.export.export(model,
    args, dynamic_shapes=...), the decomposition of the fused ops, then torch.onnx.export of that program
    with `onnx_options` (e.g. f="model.onnx"). Returns what torch.onnx.export returns (an ONNXProgram)."""
    program = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    return torch.onnx.export(program.run_decompositions(decomposition_table()), args, dynamo=True, **onnx_options)
