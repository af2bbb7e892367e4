"""The CPU kernel's upsample paths, each held to the reference wherever it can run.

At stride 1 the CPU kernel picks, by a cost rule, between the tap path (Y = W @ x per kernel tap,
then shifts and separable filters of Y per output channel) and the input-side prefilter (per-image
panels, or one batched product from 32 output channels per group up). PUSHPULL_CPU_TAP_PATH=always /
never overrides the rule, so every case below runs both ways. Invert, negate and strided upsample
take the per-image panels where the weight is thin (image_path.h). The dense loops of both are compiled
for AVX-512, AVX2 and the baseline; PUSHPULL_CPU_ISA caps the one taken (per process).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from agreement import random_grad_output
from cases import CASES, call, make_case

from pushpull_ext import push_pull_conv2d
from pushpull_ext._ext import has_cpp_kernel

pytestmark = pytest.mark.skipif(not has_cpp_kernel("cpu"), reason="the C++ CPU kernel is not built")

IN_PLACE_SIZES = (2, 4, 5, 3, 16, 3, 3)
FUSED_SIZES = (2, 3, 16, 5, 16, 3, 3)
# Upsample cases of the shared grid that have stride 1, and shapes aimed at the tap path's layout:
# rectangular kernels and images, groups, padding 0 and wider than the kernel, every output option.
UPSAMPLE_STRIDE1 = [
    (name, sizes, opts)
    for name, sizes, opts in CASES
    if opts.get("pull") == "upsample" and opts.get("stride", 1) == 1 and opts.get("scale", 2.0) != 1.0
]
TAP_CASES = UPSAMPLE_STRIDE1 + [
    (
        "tap-groups-rect-avg3-biases",
        (2, 8, 8, 7, 9, 3, 5),
        dict(pull="upsample", groups=2, padding=(1, 2), avg_kernel=3, bias_in=True, bias_out=True, alpha="vector"),
    ),
    ("tap-dual-cout16", (1, 8, 16, 6, 7, 3, 3), dict(pull="upsample", padding=1, dual_output=True, bias_in=True)),
    ("tap-pad0-scale3", (2, 3, 5, 9, 8, 3, 3), dict(pull="upsample", scale=3.0, padding=0, alpha="scalar")),
    ("tap-pad-wide-5x5", (1, 2, 3, 6, 10, 5, 5), dict(pull="upsample", padding=3, bias_out=True)),
    ("tap-1x3-depthwise", (2, 4, 4, 5, 11, 1, 3), dict(pull="upsample", groups=4, padding=(0, 1), alpha="vector")),
    # 21 columns: the vertical passes' vectors of columns (dense::triangle_rows) end with one overlapping the
    # one before.
    ("tap-rows-overlap", (2, 3, 4, 9, 21, 3, 3), dict(pull="upsample", padding=1, bias_in=True, alpha="vector")),
    # Width 16, a multiple of every vector length: the forward's product reads the image in place.
    ("tap-width16-in-place", IN_PLACE_SIZES, dict(pull="upsample", padding=1, bias_in=True, alpha="vector")),
    # Whole octets of output channels and rows of whole vectors: the prefilter route's float32 forward writes
    # the outputs from the products' registers (fused_product.h), saving ReLU(Q') for the trainable alpha.
    ("prefilter-fused-16", FUSED_SIZES, dict(pull="upsample", padding=1, bias_in=True, alpha="vector")),
    ("prefilter-fused-8-bias-out", (1, 3, 8, 4, 8, 3, 3), dict(pull="upsample", padding=1, bias_out=True)),
]
TAP_PARAMS = [pytest.param(sizes, opts, id=name) for name, sizes, opts in TAP_CASES]
# The per-image panels on images of several panels (48 pixels each), with row counts that are not
# multiples of the register tiles (16 and 12 output channels, K = 147 and 72).
LARGER_PANEL_CASES = [
    (
        "panels-invert-7x7-stride2",
        (2, 3, 16, 37, 41, 7, 7),
        dict(pull="invert", stride=2, padding=3, avg_kernel=3, bias_out=True, alpha="vector"),
    ),
    (
        "panels-upsample-stride2",
        (2, 8, 12, 30, 34, 3, 3),
        dict(pull="upsample", stride=2, padding=1, bias_in=True, alpha="vector"),
    ),
]
# Every case of the per-image panels: the grid's other cases and those above.
IMAGE_PATH_CASES = [case for case in CASES if case not in UPSAMPLE_STRIDE1] + LARGER_PANEL_CASES
LARGER_PANEL_PARAMS = [pytest.param(sizes, opts, id=name) for name, sizes, opts in LARGER_PANEL_CASES]
PATHS = ["always", "never"]


def _grads(backend, inputs, opts, grad_seed=1):
    out = call(push_pull_conv2d, inputs, opts, backend=backend)
    leaves = [t for t in inputs.values() if t.requires_grad]
    return [out, *torch.autograd.grad(out, leaves, random_grad_output(out, grad_seed))]


def _check_against_reference(sizes, opts_in, dtype, rtol, input_grad=True):
    inputs, opts = make_case(sizes, opts_in, dtype, "cpu")
    inputs["input"].requires_grad_(input_grad)
    ours = _grads("cpu", inputs, opts)
    as64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    exact = _grads("reference", as64, opts)
    names = ["output"] + [k for k, v in inputs.items() if v.requires_grad]
    for name, a, e in zip(names, ours, exact):
        scale = max(e.abs().max().item(), 1e-30)
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=rtol * scale, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sizes, options", TAP_PARAMS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_upsample_path_matches_reference(monkeypatch, path, sizes, options, dtype, rtol):
    monkeypatch.setenv("PUSHPULL_CPU_TAP_PATH", path)
    _check_against_reference(sizes, options, dtype, rtol)


@pytest.mark.parametrize("sizes, options", TAP_PARAMS)
def test_tap_path_gradcheck(monkeypatch, sizes, options):
    monkeypatch.setenv("PUSHPULL_CPU_TAP_PATH", "always")
    inputs, opts = make_case(sizes, options, torch.float64, "cpu")
    names = list(inputs)

    def fn(*tensors):
        return call(push_pull_conv2d, dict(zip(names, tensors)), opts, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()))


@pytest.mark.parametrize(
    "path, sizes, dtype",
    [("always", IN_PLACE_SIZES, torch.float64), ("never", FUSED_SIZES, torch.float32)],
    ids=["tap-in-place", "prefilter-fused"],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_per_image_routes_find_a_non_finite_last_image(monkeypatch, path, sizes, dtype, value):
    """The forward's tap product reads the image where it lies (no copy that tests it on the way), the fused
    prefilter forward writes the outputs image by image: a NaN or Inf in the last image must still send the
    batch to the exact route, as the reference propagates it."""
    monkeypatch.setenv("PUSHPULL_CPU_TAP_PATH", path)
    inputs, opts = make_case(sizes, dict(pull="upsample", padding=1, bias_in=True), dtype, "cpu")
    with torch.no_grad():
        inputs["input"][-1, 0, 1, 8] = value
    ours = call(push_pull_conv2d, inputs, opts, backend="cpu")
    expected = call(push_pull_conv2d, inputs, opts, backend="reference")
    assert not torch.isfinite(expected).all()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("path", PATHS)
def test_prefilter_fused_forward_without_gradient(monkeypatch, path):
    """Inference (no masks saved): the fused prefilter forward's other variant, against the reference."""
    monkeypatch.setenv("PUSHPULL_CPU_TAP_PATH", path)
    inputs, opts = make_case(FUSED_SIZES, dict(pull="upsample", padding=1, bias_out=True), torch.float32, "cpu")
    with torch.no_grad():
        ours = call(push_pull_conv2d, inputs, opts, backend="cpu")
        exact = call(push_pull_conv2d, {k: v.double() for k, v in inputs.items()}, opts, backend="reference")
    torch.testing.assert_close(ours.double(), exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())


# No input gradient (the stems) and output rows of whole vectors: the prefilter route's weight gradient
# reads the gradient planes where the backward epilogue wrote them, and the operands at the output pixels
# of the gapped layout (widths 16 and 32: whole AVX-512, AVX2 and SSE vectors of float and double).
WEIGHT_GRADIENT_ALONE = [
    ("fused-16", FUSED_SIZES, dict(pull="upsample", padding=1, bias_in=True, alpha="vector")),
    ("width32-5x5-bias-out", (2, 3, 8, 4, 32, 5, 5), dict(pull="upsample", padding=2, bias_out=True)),
    ("groups2-pad0", (2, 4, 8, 6, 18, 3, 3), dict(pull="upsample", groups=2, padding=0, alpha="scalar")),
]


@pytest.mark.parametrize(
    "sizes, options", [pytest.param(sizes, opts, id=name) for name, sizes, opts in WEIGHT_GRADIENT_ALONE]
)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_prefilter_weight_gradient_alone(monkeypatch, sizes, options, dtype, rtol):
    monkeypatch.setenv("PUSHPULL_CPU_TAP_PATH", "never")
    _check_against_reference(sizes, options, dtype, rtol, input_grad=False)


# Large enough that Y and the filter lines of a block of channels exceed the L2 budget (blocks of fewer
# than 8 channels), and that the per-image prefilter packs several blocks of rows.
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_upsample_paths_on_a_large_image(monkeypatch, path, dtype, rtol):
    monkeypatch.setenv("PUSHPULL_CPU_TAP_PATH", path)
    sizes = (2, 16, 12, 45, 70, 3, 3)
    options = dict(pull="upsample", padding=1, bias_in=True, alpha="vector", avg_kernel=3)
    _check_against_reference(sizes, options, dtype, rtol)


@pytest.mark.parametrize("sizes, options", LARGER_PANEL_PARAMS)
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_panels_on_larger_images(sizes, options, dtype, rtol):
    _check_against_reference(sizes, options, dtype, rtol)


# The stems' backward, without an input gradient: the per-image panels pack their operands block by block
# of output rows after the epilogue (1 MiB of operands a block: 2-5 blocks an image here, in float32 and
# float64), invert's S taken from the input planes; groups of one input channel; strided upsample's z
# beside the im2col.
STEM_BLOCK_CASES = [
    (
        "stem-invert-7x7-s2",
        (2, 3, 8, 112, 100, 7, 7),
        dict(pull="invert", stride=2, padding=3, avg_kernel=3, bias_out=True, alpha="vector"),
    ),
    ("stem-invert-groups3", (1, 3, 6, 180, 64, 7, 7), dict(pull="invert", stride=2, padding=3, groups=3)),
    (
        "stem-upsample-s2",
        (1, 4, 6, 200, 160, 3, 3),
        dict(pull="upsample", stride=2, padding=1, bias_in=True, alpha="scalar"),
    ),
]


# Strided upsample: the prefilter splits each row of its vertical pass into stride_w phases (then filters
# at stride 1). Stride 2 and 3, odd widths (phases of unequal length), a 7x7 stem like ResNet-50's; the
# per-image panels where K = C_in/groups * kh * kw <= 256 or below 32 output channels, else the batched
# product.
STRIDED_PREFILTER_CASES = [
    ("stem-7x7-s2-panels", (2, 3, 8, 29, 31, 7, 7), dict(pull="upsample", stride=2, padding=3, bias_in=True)),
    ("stem-7x7-s2-32-panels", (2, 3, 32, 29, 31, 7, 7), dict(pull="upsample", stride=2, padding=3, alpha="vector")),
    ("s2x3-panels", (2, 4, 6, 23, 25, 3, 5), dict(pull="upsample", stride=(2, 3), padding=2, alpha="scalar")),
    ("s2-batched", (2, 32, 32, 13, 15, 3, 3), dict(pull="upsample", stride=2, padding=1, alpha="vector")),
    (
        "s3x2-scale1.5-batched",
        (1, 24, 32, 17, 26, 5, 3),
        dict(pull="upsample", stride=(3, 2), padding=(1, 2), scale=1.5, bias_in=True),
    ),
]


# The forward's outputs written with non-temporal stores (PUSHPULL_CPU_STREAM_OUTPUTS=always; by default only
# when y and ReLU(Q') outgrow the last level cache), from a buffer in blocks of 256 values: planes of whole
# blocks, of a partial last block, of an odd length (16-byte stores impossible: a plain copy), on the
# per-image panels and the batched route, with ReLU(Q') saved (trainable alpha) and the dual output.
STREAMED_OUTPUT_CASES = [
    ("invert-pool5-saved", (2, 3, 16, 32, 32, 3, 3), dict(pull="invert", padding=1, avg_kernel=5, alpha="vector")),
    ("invert-s2-odd-plane", (2, 3, 8, 17, 15, 7, 7), dict(pull="invert", stride=2, padding=3, bias_out=True)),
    ("invert-partial-block", (1, 4, 8, 20, 20, 3, 3), dict(pull="invert", padding=1, alpha="scalar")),
    ("upsample-s2-dual", (2, 3, 8, 21, 21, 3, 3), dict(pull="upsample", stride=2, padding=1, dual_output=True)),
    ("upsample-batched", (2, 48, 40, 9, 11, 3, 3), dict(pull="upsample", stride=2, padding=1, alpha="vector")),
    ("tap-path", (2, 16, 16, 12, 12, 3, 3), dict(pull="upsample", padding=1, bias_in=True, alpha="vector")),
]


@pytest.mark.parametrize("sizes, options", [pytest.param(s, o, id=n) for n, s, o in STREAMED_OUTPUT_CASES])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_streamed_outputs(monkeypatch, sizes, options, dtype, rtol):
    monkeypatch.setenv("PUSHPULL_CPU_STREAM_OUTPUTS", "always")
    _check_against_reference(sizes, options, dtype, rtol)


@pytest.mark.parametrize("sizes, options", [pytest.param(s, o, id=n) for n, s, o in STRIDED_PREFILTER_CASES])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_strided_prefilter_phases(sizes, options, dtype, rtol):
    _check_against_reference(sizes, options, dtype, rtol)


@pytest.mark.parametrize("sizes, options", [pytest.param(s, o, id=n) for n, s, o in STEM_BLOCK_CASES])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_stem_backward_in_row_blocks(sizes, options, dtype, rtol):
    _check_against_reference(sizes, options, dtype, rtol, input_grad=False)


_ISA_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path[:0] = [{tests!r}, {support!r}]
    from test_cpu_paths import IMAGE_PATH_CASES, TAP_CASES, _check_against_reference
    for name, sizes, opts in TAP_CASES + IMAGE_PATH_CASES:
        for dtype, rtol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
            torch.manual_seed(0)
            _check_against_reference(sizes, opts, dtype, rtol)
    os.environ["PUSHPULL_CPU_TAP_PATH"] = "never"  # the prefilter route's fused forward
    for name, sizes, opts in TAP_CASES:
        if name.startswith("prefilter-fused"):
            torch.manual_seed(0)
            _check_against_reference(sizes, opts, torch.float32, 1e-4)
    print("ok")
""")


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_dense_loops_every_instruction_set(isa):
    """The AVX2 and baseline versions of the dense loops (this machine may take AVX-512 by default)."""
    env = dict(os.environ, PUSHPULL_CPU_ISA=isa, PUSHPULL_CPU_TAP_PATH="always")
    tests = os.path.dirname(__file__)
    script = _ISA_SCRIPT.format(tests=tests, support=os.path.join(tests, "support"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr
