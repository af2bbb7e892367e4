"""The CUDA backend without a GPU: its kernels emulated on the CPU, its ATen code run on CPU tensors.

tests/cuda_emulation/emulate.cpp gives the launchers of csrc/cuda/pushpull_launch.h a host
implementation that runs the very kernel bodies of csrc/cuda/pushpull_kernels.cuh block by block
(phase by phase, every thread of the block in turn: what __syncthreads() guarantees), and compiles
csrc/cuda/pushpull_cuda_ops.cpp, the CUDA backend's orchestration, unchanged. For these tests that
module replaces the CPU kernel of pushpull::forward / pushpull::backward, so `backend="cpu"` runs the
CUDA backend's code through the package's real autograd wrapper (pushpull_ext/ops.py).

What this cannot catch: races and out-of-bounds accesses on the GPU, launch configuration errors,
cuDNN's own behaviour. benchmarks/gpu_suite.sh runs the real thing (and compute-sanitizer) on a GPU.
"""

import os

import pytest
import torch
from agreement import assert_matches_reference, assert_rel_close, outputs_and_grads, reference_float64
from cases import CASE_PARAMS, call, case, make_case
from test_non_finite import NON_FINITE_CASES, POISON_PARAMS, assert_propagation_as_in_the_reference, poisoned_results

import pushpull_ext.functional  # noqa: F401  (registers the autograd of the ops)
from pushpull_ext import push_pull_conv2d
from pushpull_ext._ext import CPP_ERROR
from pushpull_ext.functional import forward_args
from pushpull_ext.ops import BackwardArgs, ForwardArgs, mask_planes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.skipif(CPP_ERROR is not None, reason=f"needs the compiled extension: {CPP_ERROR}"),
    pytest.mark.slow,  # compiles the emulator (C++) first: 40 to 80 s cold on 2 cores (README, "Testing")
]


@pytest.fixture(scope="module")
def emulation():
    """The emulation module, built once (cached by torch.utils.cpp_extension between runs)."""
    from torch.utils.cpp_extension import load

    sources = [
        "tests/cuda_emulation/emulate.cpp",
        "csrc/pushpull.cpp",
        "csrc/common/aten_algebra.cpp",
        "csrc/cuda/pushpull_cuda_ops.cpp",
    ]
    return load(
        "pushpull_cuda_emulation",
        [os.path.join(ROOT, s) for s in sources],
        extra_cflags=["-O2", "-DPUSHPULL_CHECKS_ONLY"],
        verbose=False,
    )


@pytest.fixture(scope="module")
def cuda_backend_on_cpu(emulation):
    """pushpull::forward/backward on CPU tensors run the emulated CUDA backend while the fixture lives."""
    calls = {"forward": 0}

    def forward(*args, **kwargs):
        calls["forward"] += 1
        # save_pull (given or not: it has a default) is the CPU kernel's: the emulated CUDA kernels recompute
        # the pull response, and their buffer holds the masks alone (which the backward accepts).
        op = ForwardArgs(*args, **kwargs)
        return emulation.forward(*op[: op._fields.index("save_pull")])

    library = torch.library.Library("pushpull", "IMPL")
    library.impl("forward", forward, "CPU")
    library.impl("backward", emulation.backward, "CPU")
    yield calls
    library._destroy()
    # The package's own CPU kernel is back: the other test modules must not run the emulation.
    before = calls["forward"]
    x, w = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1)
    push_pull_conv2d(x, w, pull="upsample", scale=1.0, backend="cpu")
    assert calls["forward"] == before, "the override of the CPU kernel was not removed"


def test_override_runs_the_emulation(cuda_backend_on_cpu):
    before = cuda_backend_on_cpu["forward"]
    push_pull_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), padding=1, backend="cpu")
    assert cuda_backend_on_cpu["forward"] == before + 1


# ---------------------------------------------------------------- agreement with the formula


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_float64_matches_reference(cuda_backend_on_cpu, sizes, options):
    inputs, opts = make_case(sizes, options, torch.float64, "cpu")
    assert_matches_reference("cpu", inputs, opts, 1e-9)


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_gradcheck_float64(cuda_backend_on_cpu, sizes, options):
    inputs, opts = make_case(sizes, options, torch.float64, "cpu")
    names = list(inputs)

    def fn(*tensors):
        return call(push_pull_conv2d, dict(zip(names, tensors)), opts, backend="cpu")

    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), fast_mode=True)


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_float32_within_spec(cuda_backend_on_cpu, sizes, options):
    n, c_in, c_out, h, w, kh, kw = sizes
    inputs, opts = make_case((n, c_in * 2, c_out * 2, h, w, kh, kw), options, torch.float32, "cpu", scale_hw=2)
    assert_matches_reference("cpu", inputs, opts, 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_low_precision_within_twice_eager_error(cuda_backend_on_cpu, dtype, sizes, options):
    """The 16-bit paths: convolutions in the input's dtype, our kernels reading/writing 16-bit storage."""
    inputs, opts = make_case(sizes, options, torch.float64, "cpu", requires_grad=False, scale_hw=2)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    exact = call(push_pull_conv2d, inputs, opts, backend="reference")
    ours = call(push_pull_conv2d, low, opts, backend="cpu")
    eager = call(push_pull_conv2d, low, opts, backend="reference")
    assert ours.dtype == dtype
    our_error = (ours.double() - exact).abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    assert our_error <= 2 * eager_error + 1e-6, f"ours {our_error:.3g} vs eager {eager_error:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_low_precision_is_float32_rounded_once(cuda_backend_on_cpu, dtype, sizes, options):
    """16-bit operands are computed in float32 and rounded once: the ops' output, masks and every
    gradient equal, bit for bit, what the ops give for the same values in float32, rounded to the 16-bit
    type (our kernels' own 16-bit conversions included). (16-bit gradients are not compared with
    eager's: near P = 0 or Q' = 0 a ReLU mask flips at random in either, and one flip outweighs every
    rounding error.)"""
    inputs, opts = make_case(sizes, options, torch.float64, "cpu", requires_grad=False, scale_hw=2)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    operands = call(forward_args, low, opts, save_masks=True)
    as_float = operands._replace(**{k: v.float() for k, v in operands._asdict().items() if isinstance(v, torch.Tensor)})

    def forward(o):
        return torch.ops.pushpull.forward(*o)

    def backward(o, grad, masks):
        return torch.ops.pushpull.backward(*BackwardArgs.after(o, grad, masks, [True] * 6))

    out, masks = forward(operands)
    out32, masks32 = forward(as_float)
    assert out.dtype == dtype and torch.equal(out, out32.to(dtype))
    assert torch.equal(masks, masks32)
    grad = torch.randn(out.shape, dtype=dtype)
    for i, (g, g32) in enumerate(zip(backward(operands, grad, masks), backward(as_float, grad.float(), masks))):
        assert g.dtype == dtype and torch.equal(g, g32.to(dtype)), f"gradient {i}"


@pytest.mark.parametrize(
    "name,which",
    [("2024-stem", which) for which in ("input", "weight", "bias_out", "alpha")]
    + [("2020-wide-groups-stride-avg3", which) for which in ("input", "weight")],
)
def test_gradient_of_one_input_only(cuda_backend_on_cpu, name, which):
    """Only one gradient asked: the wrapper passes placeholders for what backward must not read (invert,
    and upsample with its prefilter path)."""
    inputs, opts = make_case(*case(name), torch.float64, "cpu", requires_grad=False)
    inputs[which].requires_grad_(True)
    _, grads = outputs_and_grads("cpu", inputs, opts)
    _, ref_grads = reference_float64(inputs, opts)
    assert_rel_close(grads[0], ref_grads[0], 1e-9, f"grad of {which}")


def test_invert_ties_share_gradient_like_autograd(cuda_backend_on_cpu):
    inputs, opts = make_case(*case("2024-stem"), torch.float64, "cpu")
    with torch.no_grad():
        inputs["weight"].copy_(torch.round(inputs["weight"] * 4) / 4)
    _, grads = outputs_and_grads("cpu", inputs, opts)
    _, ref_grads = reference_float64(inputs, opts)
    assert_rel_close(grads[1], ref_grads[1], 1e-9, "grad of weight with ties")


# A 9x9 kernel upsampled to 19x19 with stride 4: in float64 the prefilter's tiles exceed the 48 KiB of
# shared memory, so the pull kernel is formed and convolved directly; in float32 they fit.
LARGE_KERNEL = (
    (2, 3, 5, 40, 37, 9, 9),
    dict(pull="upsample", stride=4, padding=4, bias_in=True, avg_kernel=3, alpha="vector"),
)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["direct", "prefilter"])
def test_large_upsampled_kernel(cuda_backend_on_cpu, dtype, rtol):
    inputs, opts = make_case(*LARGE_KERNEL, dtype, "cpu")
    assert_matches_reference("cpu", inputs, opts, rtol)


# Several tiles per plane, partial tiles at the right and bottom borders, C_out not a multiple of 8, halos
# crossing tile borders (avg 5), every prefilter/adjoint tile shape of a 70 x 45 image.
MANY_TILES = [
    pytest.param(
        (3, 5, 11, 70, 45, 3, 3), dict(pull="upsample", padding=1, avg_kernel=3, alpha="vector"), id="upsample"
    ),
    pytest.param(
        (2, 4, 10, 70, 45, 3, 3),
        dict(pull="invert", padding=1, avg_kernel=5, bias_in=True, bias_out=True, alpha="vector"),
        id="invert",
    ),
]


@pytest.mark.parametrize("sizes, options", MANY_TILES)
def test_many_tiles(cuda_backend_on_cpu, sizes, options):
    inputs, opts = make_case(sizes, options, torch.float64, "cpu")
    assert_matches_reference("cpu", inputs, opts, 1e-9)


def test_empty_batch(cuda_backend_on_cpu):
    inputs, opts = make_case(
        (0, 4, 6, 7, 6, 3, 3), dict(pull="invert", padding=1, avg_kernel=3, bias_in=True), torch.float64, "cpu"
    )
    out, grads = outputs_and_grads("cpu", inputs, opts)
    assert out.shape == (0, 6, 7, 6)
    assert all(g.abs().sum() == 0 for g in grads)


# ---------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("target, value, image", POISON_PARAMS)
@pytest.mark.parametrize("sizes, options", NON_FINITE_CASES)
def test_nan_and_inf_propagate_as_in_the_reference(cuda_backend_on_cpu, sizes, options, target, value, image):
    """tests/test_non_finite.py on the CUDA backend's code: where the algebra's pull response is not finite
    (Inf - Inf = NaN in the prefilter's z or in shift * S - P0) the kernels compute conv(x, q) itself, and a
    NaN response sets its ReLU mask bit (torch's ReLU passes the gradient there)."""
    assert_propagation_as_in_the_reference(*poisoned_results("cpu", "cpu", sizes, options, target, value, image))


# ---------------------------------------------------------------- the masks


def _packed_masks(push, pull):
    """uint8 [2, N, ceil(C/8), H, W] with bit o % 8 of byte o // 8 set where the response is > 0."""
    n, c, h, w = push.shape
    bits = torch.stack([push > 0, pull > 0]).to(torch.int32)
    bits = torch.nn.functional.pad(bits, (0, 0, 0, 0, 0, (-c) % 8)).view(2, n, -1, 8, h, w)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).view(1, 1, 1, 8, 1, 1)
    return (bits * weights).sum(3).to(torch.uint8)


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_masks_are_the_relu_derivatives(cuda_backend_on_cpu, sizes, options):
    import torch.nn.functional as F

    from pushpull_ext.reference import pull_kernel

    inputs, opts = make_case(sizes, options, torch.float64, "cpu", requires_grad=False)
    x, w, bias = inputs["input"], inputs["weight"], inputs.get("bias")
    op = call(forward_args, inputs, opts, save_masks=True)
    _, masks = torch.ops.pushpull.forward(*op)
    conv = dict(stride=op.stride, dilation=op.dilation, groups=op.groups)
    push = F.conv2d(x, w, bias, padding=op.padding, **conv)
    pull_weight = pull_kernel(w, opts["pull"], opts.get("scale", 2.0))
    pull = F.conv2d(x, pull_weight, None if bias is None else -bias, padding=op.pull_padding, **conv)
    if op.avg_kernel > 1:
        a = op.avg_kernel
        pull = F.avg_pool2d(pull, a, stride=1, padding=(a - 1) // 2, count_include_pad=False)
    assert torch.equal(mask_planes(masks, push.shape, push.shape[1]), _packed_masks(push, pull))


# ---------------------------------------------------------------- 16-bit conversions of the kernels


def test_half_to_float_is_exact_for_every_bit_pattern(emulation):
    bits = torch.arange(-32768, 32768, dtype=torch.int32)
    ours = emulation.half_bits_to_float(bits & 0xFFFF)
    torch_values = bits.to(torch.int16).view(torch.float16).float()
    assert torch.equal(ours.isnan(), torch_values.isnan())
    finite = ~torch_values.isnan()
    assert torch.equal(ours[finite].view(torch.int32), torch_values[finite].view(torch.int32))  # signed zeros too


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_to_16bit_rounds_to_nearest_even(emulation, dtype):
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
    every = every[~every.isnan()]
    neighbours = torch.nextafter(every, torch.full_like(every, float("inf")))
    midpoints = (every[:-1].double() + every[1:].double()).div(2).float()  # ties: even rounding decides
    special = torch.tensor(
        [
            0.0,
            -0.0,
            1e-8,
            -1e-8,
            6e-8,
            3e-8,
            65504.0,
            65519.0,
            65520.0,
            1e6,
            -1e6,
            float("inf"),
            float("-inf"),
            3.0e38,
            1e-40,
        ]
    )
    values = torch.cat([every, neighbours, midpoints.sort().values, special, torch.randn(100000) * 100])
    values = values[torch.isfinite(values) | values.isinf()]
    ours = emulation.float_to_16bit(values, dtype == torch.bfloat16)
    theirs = values.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(ours, theirs)
    nan_bits = emulation.float_to_16bit(torch.tensor([float("nan")]), dtype == torch.bfloat16)
    assert torch.tensor([nan_bits.item()]).to(torch.int16).view(dtype).isnan().item()
