"""The option grid the tests run on every backend: every SPEC option appears in some case.

A case is (id, sizes, options): sizes = (N, C_in, C_out, H, W, kh, kw); options are the keyword
arguments of push_pull_conv2d, plus "bias_in" / "bias_out" (bool) and "alpha" ("number", "scalar"
for a 0-d tensor, "vector" for [C_out]). Its tensors are built by pushpull_ext.shapes.make_inputs,
the benchmarks' builder, from the shapes.Case `grid_case` makes of it.
"""

import pytest
import torch

from pushpull_ext.shapes import Case, make_inputs

# The grid's alpha forms as shapes.Case alphas: (alpha, alpha_value, alpha_spread).
_ALPHAS = {"number": ("number", 0.7, 0.0), "scalar": ("scalar", 0.8, 0.0), "vector": ("per-channel", 0.2, 1.0)}

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


# The grid's widest case: under the Triton interpreter (triton on CPU tensors) its 64 channels take minutes per
# test, so the checks that add no kernel path of their own (float32, unbatched, opcheck) skip it there.
WIDE_NAME = "2020-wide-groups-stride-avg3"


def skip_under_the_interpreter_unless(backend, device, kept: bool, why: str):
    """The Triton interpreter (triton on CPU tensors) runs a grid's kernel-facing part only: `why` says what the
    other cases add, which the C++ kernel and the reference check here and a GPU checks for Triton."""
    if backend == "triton" and device == "cpu" and not kept:
        pytest.skip(f"too slow under the Triton interpreter, and {why}")


def skip_the_wide_case_under_the_interpreter(backend, device, request, why: str):
    """skip_under_the_interpreter_unless for WIDE_NAME (in the test's parameter id)."""
    skip_under_the_interpreter_unless(backend, device, WIDE_NAME not in request.node.callspec.id, why)


def case(name):
    """(sizes, options) of the case called `name`."""
    return next((sizes, options) for case_name, sizes, options in CASES if case_name == name)


def case_params(*names):
    return [p for p in CASE_PARAMS if p.id in names]


def grid_case(sizes, options, scale_hw=1) -> Case:
    """The shapes.Case of a grid case (its spatial size scale_hw times larger)."""
    n, c_in, c_out, h, w, kh, kw = sizes
    alpha, alpha_value, alpha_spread = _ALPHAS[options.get("alpha", "number")]
    geometry = {
        name: options[name] for name in ("scale", "avg_kernel", "dilation", "groups", "dual_output") if name in options
    }
    return Case(
        "grid",
        "test grid",
        *(n, c_in, c_out, h * scale_hw, w * scale_hw),
        kernel=kh,
        kernel_w=kw,
        stride=options.get("stride", 1),
        padding=options.get("padding", 0),
        pull=options["pull"],
        bias_in=options.get("bias_in", False),
        bias_out=options.get("bias_out", False),
        alpha=alpha,
        alpha_value=alpha_value,
        alpha_spread=alpha_spread,
        **geometry,
    )


def make_case(sizes, options, dtype, device, requires_grad=True, scale_hw=1):
    """Tensors and keyword arguments of one case: returns (inputs dict: input, weight and the present ones
    of bias, bias_out and a tensor alpha; options but bias_in / bias_out, with a number alpha). The values
    are drawn from a seed taken from torch's global generator."""
    seed = int(torch.randint(2**31 - 1, ()))
    built = make_inputs(grid_case(sizes, options, scale_hw), device, dtype, seed=seed)
    inputs = {name: t.requires_grad_(requires_grad) for name, t in built.tensors.items() if isinstance(t, torch.Tensor)}
    opts = {name: value for name, value in options.items() if name not in ("bias_in", "bias_out", "alpha")}
    if not isinstance(built.tensors["alpha"], torch.Tensor):
        opts["alpha"] = built.tensors["alpha"]
    return inputs, opts


def call(fn, inputs, opts, **extra):
    """fn(input, weight, bias=..., bias_out=..., alpha=..., **opts) from an inputs dict."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("input", "weight")}
    return fn(inputs["input"], inputs["weight"], **kwargs, **opts, **extra)
