"""Argument checks of the Triton ops, for direct calls of torch.ops.pushpull.triton_forward / _backward.

The public API (`push_pull_conv2d`, `PushPullConv2d`) checks its arguments first with friendlier
messages (options.normalize); the C++ ops run the same checks as this module in csrc/pushpull.cpp
(`check_forward_args`, `check_backward_args`) before any kernel reads memory. The Triton ops are
Python, so these are their counterpart: consistent shapes, dtypes and devices, or a RuntimeError
naming the argument — never an out-of-bounds read on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .options import conv_output_size, mask_bytes


def _fail(message: str) -> None:
    raise RuntimeError(f"pushpull: {message}")


def _check_pair(values: Sequence[int], name: str, minimum: int) -> None:
    if len(values) != 2 or min(values) < minimum:
        _fail(f"{name} must have 2 elements >= {minimum}, got {list(values)}")


def _check_like_input(t: Optional[Tensor], input: Tensor, name: str, shape: Optional[tuple] = None) -> None:
    if t is None:
        return
    if shape is not None and tuple(t.shape) != shape:
        _fail(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != input.dtype or t.device != input.device:
        _fail(
            f"{name} must have the input's dtype and device ({input.dtype}, {input.device}), "
            f"got {t.dtype} on {t.device}"
        )


def check_forward(args) -> tuple[int, int]:
    """Checks the arguments of a push-pull forward op (an ops.ForwardArgs); returns the output size (Ho, Wo)."""
    input, weight = args.input, args.weight
    if input.dim() != 4 or weight.dim() != 4:
        _fail(f"input and weight must be 4-D, got {list(input.shape)} and {list(weight.shape)}")
    if not input.dtype.is_floating_point:
        _fail(f"input must be floating point, got {input.dtype}")
    _check_like_input(weight, input, "weight")
    for name, minimum in (("stride", 1), ("dilation", 1), ("padding", 0), ("pull_padding", 0)):
        _check_pair(getattr(args, name), name, minimum)
    groups, avg_kernel = args.groups, args.avg_kernel
    if groups < 1:
        _fail(f"groups must be positive, got {groups}")
    if avg_kernel < 0 or (avg_kernel > 1 and avg_kernel % 2 == 0):
        _fail(f"avg_kernel must be 0, 1 or odd, got {avg_kernel}")
    if args.pull_shift is not None and args.pull_rows is not None:
        _fail("give pull_shift or pull_rows/pull_cols, not both")
    if (args.pull_rows is None) != (args.pull_cols is None):
        _fail("pull_rows and pull_cols go together")
    if args.dual_output and args.bias_out is not None:
        _fail("bias_out cannot be used with dual_output")
    if args.save_pull:
        _fail("save_pull is a CPU option; the Triton backward recomputes the pull response")
    n, c_in, h, w = input.shape
    c_out, c_group, kh, kw = weight.shape
    if min(c_out, kh, kw) < 1 or c_in % groups or c_out % groups or c_group * groups != c_in:
        _fail(f"input channels {c_in}, weight {list(weight.shape)} and groups {groups} do not match")
    out = _output_size(args, (h, w), (kh, kw), args.padding)
    if min(out) < 1:
        _fail("kernel is larger than the padded input")
    for name in ("pull_shift", "bias_in", "bias_out", "alpha"):
        _check_like_input(getattr(args, name), input, name, (c_out,))
    if args.pull_rows is not None:
        _check_pull_matrices(args, (h, w), (kh, kw), out)
    return out


def _output_size(args, size, kernel, padding) -> tuple[int, int]:
    return tuple(conv_output_size(size[i], kernel[i], args.stride[i], padding[i], args.dilation[i]) for i in range(2))


def _check_pull_matrices(args, size, kernel, out) -> None:
    """pull_rows [qh, kh] and pull_cols [qw, kw], whose pull response has the push response's size `out`."""
    for name, k in zip(("pull_rows", "pull_cols"), kernel):
        m = getattr(args, name)
        if m.dim() != 2 or m.shape[1] != k or m.shape[0] < k:
            _fail(f"{name} must have shape [q, {k}] with q >= {k}, got {list(m.shape)}")
        _check_like_input(m, args.input, name)
    pull_out = _output_size(args, size, (args.pull_rows.shape[0], args.pull_cols.shape[0]), args.pull_padding)
    if pull_out != out:
        _fail(f"pull and push responses would have different shapes ({list(pull_out)} and {list(out)})")


def check_backward(args) -> None:
    """Checks the arguments of the Triton backward op (an ops.BackwardArgs: the forward's, grad_output and
    the masks)."""
    ho, wo = check_forward(args.forward_args())
    input, masks = args.input, args.masks
    n, c_out = input.shape[0], args.weight.shape[0]
    expected = (n, (2 if args.dual_output else 1) * c_out, ho, wo)
    _check_like_input(args.grad_output, input, "grad_output", expected)
    length = mask_bytes(n, c_out, ho, wo)
    # An empty uint8 tensor (a forward with save_masks=False) is accepted: the Triton backward then
    # recomputes the masks.
    if masks.dtype != torch.uint8 or (masks.numel() != 0 and tuple(masks.shape) != (length,)):
        _fail(
            f"masks must be the uint8 tensor [{length}] saved by the forward (save_masks=True) or empty, "
            f"got {masks.dtype} {list(masks.shape)}"
        )
    if masks.device != input.device:
        _fail(f"masks must be on the input's device ({input.device}), got {masks.device}")
