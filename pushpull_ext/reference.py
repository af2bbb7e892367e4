"""The push-pull formula in plain PyTorch ops: the one source of truth every backend is tested against.

It is also the eager baseline of the benchmarks: it runs the two convolutions, the ReLUs and the
pooling the way the papers' own modules do. Being plain ops, it supports every autograd feature and
transform (double backward, forward-mode AD, vmap, ...): `op_formula` evaluates it from the fused ops'
own arguments, and serves where the fused kernels cannot (see functional.py and ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import PADDING_MODES, PushPullArgs, upsampled_size


def pull_kernel(weight: torch.Tensor, pull: str, scale: float = 2.0) -> torch.Tensor:
    """q(k): the pull kernel derived from the push kernel (differentiable in `weight`)."""
    if pull == "invert":
        # 2024: -k + (max + min) of each output filter over (C_in/groups, kh, kw).
        dims = (1, 2, 3)
        return -weight + (weight.amax(dims, keepdim=True) + weight.amin(dims, keepdim=True))
    if pull == "upsample":
        if scale == 1:
            return -weight
        size = tuple(upsampled_size(k, scale) for k in weight.shape[2:])
        return -F.interpolate(weight, size=size, mode="bilinear", align_corners=True)
    raise ValueError(f"unknown pull mode {pull!r}")


def pull_kernel_from_operands(weight, pull_shift, pull_rows, pull_cols) -> torch.Tensor:
    """q(k) from the fused ops' pull operands (options.pull_operands): -k + shift, -rows @ k @ cols^T or -k
    (the product in float32 at least, then in the weight's dtype)."""
    if pull_shift is not None:
        return -weight + pull_shift.view(-1, 1, 1, 1)
    if pull_rows is not None:
        wide = torch.promote_types(weight.dtype, torch.float32)
        return (-(pull_rows.to(wide) @ weight.to(wide) @ pull_cols.to(wide).t())).to(weight.dtype)
    return -weight


def pooled(pull, avg_kernel: int) -> torch.Tensor:
    """Q' = the pull response averaged over avg_kernel x avg_kernel (stride 1, count_include_pad=False)."""
    if avg_kernel > 1:
        pull = F.avg_pool2d(pull, avg_kernel, stride=1, padding=(avg_kernel - 1) // 2, count_include_pad=False)
    return pull


def combine(push, pull, bias_out, alpha, avg_kernel: int, dual_output: bool, masks=None) -> torch.Tensor:
    """y from the push and pull responses P and Q: ReLU(P) - alpha * ReLU(Q') + b_out (or the dual output).

    With `masks` (ReLU'(P), ReLU'(Q') as two tensors of P's shape) the ReLUs are those fixed masks: the
    local linear map whose derivatives are the layer's (ReLU'' = 0), as the fused ops' backward uses.
    """
    pull = pooled(pull, avg_kernel)
    relu_push, relu_pull = (F.relu(push), F.relu(pull)) if masks is None else (push * masks[0], pull * masks[1])
    if dual_output:
        return torch.cat([relu_push, relu_pull], dim=1)
    out = relu_push - alpha.view(1, -1, 1, 1) * relu_pull
    if bias_out is not None:
        out = out + bias_out.view(1, -1, 1, 1)
    return out


def _negated(bias):
    return None if bias is None else -bias


def _conv(input, kernel, bias, args: PushPullArgs, pad_amounts) -> torch.Tensor:
    """One of the two convolutions, as an nn.Conv2d with args.padding_mode would compute it."""
    conv = dict(stride=args.stride, dilation=args.dilation, groups=args.groups)
    if args.explicit_padding:
        padded = F.pad(input, pad_amounts, mode=PADDING_MODES[args.padding_mode])
        return F.conv2d(padded, kernel, bias, padding=0, **conv)
    return F.conv2d(input, kernel, bias, padding=(pad_amounts[2], pad_amounts[0]), **conv)


def push_pull_reference(input, weight, bias_in, bias_out, alpha, args: PushPullArgs, pull_weight=None) -> torch.Tensor:
    """y = ReLU(P) - alpha * ReLU(Q') + b_out, or cat([ReLU(P), ReLU(Q')]) for the dual output.

    `alpha` is a [C_out] tensor (see options.normalize); `args` the normalized options; `pull_weight`
    the pull kernel if derived elsewhere (under autocast: from the float32 weight), else pull_kernel(weight).
    """
    push, pull = responses(input, weight, bias_in, args, pull_weight)
    return combine(push, pull, bias_out, alpha, args.avg_kernel, args.dual_output)


def responses(input, weight, bias_in, args: PushPullArgs, pull_weight=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The push response P and the (unpooled) pull response Q of the formula, biases included."""
    if pull_weight is None:
        pull_weight = pull_kernel(weight, args.pull, args.scale)
    kernel_size = tuple(weight.shape[2:])
    push = _conv(input, weight, bias_in, args, args.pad_amounts(kernel_size))
    pull = _conv(input, pull_weight, _negated(bias_in), args, args.pad_amounts(kernel_size, pull=True))
    return push, pull


def op_formula(
    input,
    weight,
    pull_shift,
    pull_rows,
    pull_cols,
    bias_in,
    bias_out,
    alpha,
    stride,
    padding,
    pull_padding,
    dilation,
    groups,
    avg_kernel,
    dual_output,
    masks=None,
) -> torch.Tensor:
    """The output of the fused forward op (ops.py) for the same arguments, in plain ops (zero padding,
    the pull kernel from the pull operands). `masks` as in `combine`."""
    pull_weight = pull_kernel_from_operands(weight, pull_shift, pull_rows, pull_cols)
    conv = dict(stride=stride, dilation=dilation, groups=groups)
    push = F.conv2d(input, weight, bias_in, padding=padding, **conv)
    pull = F.conv2d(input, pull_weight, _negated(bias_in), padding=pull_padding, **conv)
    return combine(push, pull, bias_out, alpha, avg_kernel, dual_output, masks)
