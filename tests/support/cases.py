"""The option grid the tests run on every backend: every SPEC option appears in some case.

A case is (id, sizes, options): sizes = (N, C_in, C_out, H, W, kh, kw); options are the keyword
arguments of push_pull_conv2d, plus "bias_in" / "bias_out" (bool) and "alpha" ("number", "scalar"
for a 0-d tensor, "vector" for [C_out]).
"""

import pytest
import torch

SMALL = (2, 4, 6, 7, 6, 3, 3)

CASES = [
    ("2020-default", SMALL, dict(pull="upsample", scale=2.0, padding=1, bias_in=True, alpha="number")),
    (
        "2020-groups-stride-rect",
        (2, 4, 6, 9, 8, 3, 5),
        dict(pull="upsample", groups=2, stride=2, padding=(1, 2), alpha="vector"),
    ),
    (
        "2020-scale1-dilation",
        SMALL,
        dict(pull="upsample", scale=1.0, dilation=2, padding=2, bias_in=True, alpha="scalar"),
    ),
    (
        "2020-scale1.5-avg3-bout",
        SMALL,
        dict(pull="upsample", scale=1.5, padding=1, avg_kernel=3, bias_out=True, alpha="vector"),
    ),
    # >= 32 output channels per group: the CPU kernel's prefilter + matrix-product path for upsample
    (
        "2020-wide-groups-stride-avg3",
        (1, 4, 64, 6, 5, 3, 3),
        dict(pull="upsample", groups=2, stride=(1, 2), padding=1, avg_kernel=3, bias_in=True, alpha="vector"),
    ),
    ("2020-dual", SMALL, dict(pull="upsample", padding=1, bias_in=True, dual_output=True)),
    ("2024-stem", SMALL, dict(pull="invert", stride=2, padding=1, avg_kernel=3, bias_out=True, alpha="vector")),
    (
        "2024-avg5-groups-biases",
        SMALL,
        dict(pull="invert", padding=2, groups=2, avg_kernel=5, bias_in=True, bias_out=True, alpha="scalar"),
    ),
    ("2024-dual-avg3", SMALL, dict(pull="invert", avg_kernel=3, bias_in=True, dual_output=True)),
    ("2024-dilation-rect-nopad", (2, 4, 5, 9, 9, 1, 3), dict(pull="invert", dilation=2, stride=(1, 2), alpha="vector")),
    (
        "2024-no-pooling-cout9",
        (1, 3, 9, 6, 7, 3, 3),
        dict(pull="invert", padding=1, avg_kernel=1, bias_in=True, alpha="number"),
    ),
]

CASE_PARAMS = [pytest.param(sizes, options, id=name) for name, sizes, options in CASES]


def case(name):
    """(sizes, options) of the case called `name`."""
    return next((sizes, options) for case_name, sizes, options in CASES if case_name == name)


def case_params(*names):
    return [p for p in CASE_PARAMS if p.id in names]


def make_case(sizes, options, dtype, device, requires_grad=True, scale_hw=1):
    """Tensors and keyword arguments of one case: returns (inputs dict, kwargs)."""
    n, c_in, c_out, h, w, kh, kw = sizes
    opts = dict(options)
    groups = opts.get("groups", 1)
    make = dict(dtype=dtype, device=device)
    inputs = {
        "input": torch.randn(n, c_in, h * scale_hw, w * scale_hw, **make),
        "weight": torch.randn(c_out, c_in // groups, kh, kw, **make) / (c_in * kh * kw) ** 0.5,
    }
    if opts.pop("bias_in", False):
        inputs["bias"] = 0.1 * torch.randn(c_out, **make)
    if opts.pop("bias_out", False):
        inputs["bias_out"] = 0.1 * torch.randn(c_out, **make)
    alpha = opts.pop("alpha", "number")
    if alpha == "scalar":
        inputs["alpha"] = torch.tensor(0.8, **make)
    elif alpha == "vector":
        inputs["alpha"] = torch.rand(c_out, **make) + 0.2
    else:
        opts["alpha"] = 0.7
    for t in inputs.values():
        t.requires_grad_(requires_grad)
    return inputs, opts


def call(fn, inputs, opts, **extra):
    """fn(input, weight, bias=..., bias_out=..., alpha=..., **opts) from an inputs dict."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("input", "weight")}
    return fn(inputs["input"], inputs["weight"], **kwargs, **opts, **extra)
