"""The SPEC formula in plain PyTorch ops: the one source of truth every backend is tested against.

It is also the eager baseline of the benchmarks: it runs the two convolutions, the ReLUs and the
pooling the way the papers' own modules do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .options import PushPullArgs, upsampled_size


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


def push_pull_reference(input, weight, bias_in, bias_out, alpha, args: PushPullArgs,
                        pull_weight=None) -> torch.Tensor:
    """y = ReLU(P) - alpha * ReLU(Q') + b_out, or cat([ReLU(P), ReLU(Q')]) for the dual output.

    `alpha` is a [C_out] tensor (see options.normalize); `args` the normalized options; `pull_weight`
    the pull kernel if derived elsewhere (under autocast: from the float32 weight), else pull_kernel(weight).
    """
    if pull_weight is None:
        pull_weight = pull_kernel(weight, args.pull, args.scale)
    conv = dict(stride=args.stride, dilation=args.dilation, groups=args.groups)
    push = F.conv2d(input, weight, bias_in, padding=args.padding, **conv)
    pull_bias = None if bias_in is None else -bias_in
    pull = F.conv2d(input, pull_weight, pull_bias,
                    padding=args.pull_padding(tuple(weight.shape[2:])), **conv)
    if args.avg_kernel > 1:
        a = args.avg_kernel
        pull = F.avg_pool2d(pull, a, stride=1, padding=(a - 1) // 2, count_include_pad=False)
    if args.dual_output:
        return torch.cat([F.relu(push), F.relu(pull)], dim=1)
    out = F.relu(push) - alpha.view(1, -1, 1, 1) * F.relu(pull)
    if bias_out is not None:
        out = out + bias_out.view(1, -1, 1, 1)
    return out
