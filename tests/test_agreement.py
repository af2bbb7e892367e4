"""Every backend against the reference (the formula, pushpull_ext/reference.py) on every option: float64 to 1e-9 with
gradcheck, float32 to 1e-4 relative, low precision within 2x of eager PyTorch's own error."""

import pytest
import torch
from agreement import (
    assert_matches_reference,
    assert_rel_close,
    gradcheck,
    gradcheck_jointly,
    outputs_and_grads,
    reference_float64,
)
from cases import (
    CASE_PARAMS,
    call,
    case,
    make_case,
    skip_the_wide_case_under_the_interpreter,
    skip_under_the_interpreter_unless,
)

from pushpull_ext import push_pull_conv2d


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_float64_matches_reference(backend_device, sizes, options):
    backend, device = backend_device
    inputs, opts = make_case(sizes, options, torch.float64, device)
    assert_matches_reference(backend, inputs, opts, 1e-9)


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_gradcheck_float64(backend_device, request, sizes, options):
    backend, device = backend_device
    # Under the interpreter the wide case's gradcheck took two minutes, the README tier's longest test. Its kernel
    # paths (64-wide channel tiles) are checked by test_float64_matches_reference, every gradient to 1e-9, and the
    # backward's formula by gradcheck on every other case.
    skip_the_wide_case_under_the_interpreter(backend, device, request, "float64 agreement checks its gradients")
    inputs, opts = make_case(sizes, options, torch.float64, device)
    names = list(inputs)

    def fn(*tensors):
        return call(push_pull_conv2d, dict(zip(names, tensors)), opts, backend=backend)

    # Full Jacobians for the shipped CPU kernel; gradcheck's fast mode (random projections) for the
    # reference, whose autograd is PyTorch's own, and for the Triton and CUDA kernels, of every input at once
    # (gradcheck_jointly: two forwards in all, not two per input, each seconds under the interpreter).
    if backend in ("cpu", "reference"):
        assert gradcheck(fn, tuple(inputs.values()), fast_mode=backend == "reference")
    else:
        assert gradcheck_jointly(fn, tuple(inputs.values()))


@pytest.mark.parametrize("which", ["input", "weight", "bias_out"])
def test_gradient_of_one_input_only(backend_device, which):
    """Backward computes (and saves inputs for) only what is asked: each alone must still be right."""
    backend, device = backend_device
    sizes, options = case("2024-stem")  # 2024 stem: every vector argument present
    inputs, opts = make_case(sizes, options, torch.float64, device, requires_grad=False)
    inputs[which].requires_grad_(True)
    out, grads = outputs_and_grads(backend, inputs, opts)
    ref_out, ref_grads = reference_float64(inputs, opts)
    assert_rel_close(grads[0], ref_grads[0], 1e-9, f"grad of {which}")


def test_invert_ties_share_gradient_like_autograd(backend_device):
    """amax/amin ties (quantized weights) split the pull gradient evenly, as torch autograd does."""
    backend, device = backend_device
    sizes, options = case("2024-stem")
    inputs, opts = make_case(sizes, options, torch.float64, device)
    with torch.no_grad():
        inputs["weight"].copy_(torch.round(inputs["weight"] * 4) / 4)  # many equal max/min taps
    out, grads = outputs_and_grads(backend, inputs, opts)
    ref_out, ref_grads = reference_float64(inputs, opts)
    assert_rel_close(grads[1], ref_grads[1], 1e-9, "grad of weight with ties")


FLOAT32_UNDER_THE_INTERPRETER = ("2020-default", "2024-stem")


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_float32_within_spec(backend_device, request, sizes, options):
    backend, device = backend_device
    # The interpreter's tl.dot is exact float32 (no TF32): there float32 runs the float64 cases' kernels with
    # a float32 accumulator, on inputs twice as wide and four times as large, a minute per case; the papers'
    # two layers stand for the grid (tests/test_triton_launch.py checks float32 on the launcher's grid).
    kept = request.node.callspec.id in FLOAT32_UNDER_THE_INTERPRETER
    skip_under_the_interpreter_unless(backend, device, kept, "its float32 is the float64 kernels' (exact tl.dot)")
    # (1e-4 relative: with TF32 off on a GPU, as tests/conftest.py's no_tf32 sets it for every test.)
    n, c_in, c_out, h, w, kh, kw = sizes
    inputs, opts = make_case((n, c_in * 2, c_out * 2, h, w, kh, kw), options, torch.float32, device, scale_hw=2)
    assert_matches_reference(backend, inputs, opts, 1e-4)


def _low_precision_dtypes(backend, device):
    if backend == "triton" and device == "cpu":
        return []  # the interpreter has no bf16/fp16 arithmetic
    return [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_low_precision_within_twice_eager_error(fused_backend_device, dtype, sizes, options):
    backend, device = fused_backend_device
    if dtype not in _low_precision_dtypes(backend, device):
        pytest.skip("the Triton interpreter has no bf16/fp16 arithmetic")
    inputs, opts = make_case(sizes, options, torch.float64, device, requires_grad=False, scale_hw=2)
    low = {k: v.to(dtype) for k, v in inputs.items()}
    exact = call(push_pull_conv2d, inputs, opts, backend="reference")
    ours = call(push_pull_conv2d, low, opts, backend=backend)
    eager = call(push_pull_conv2d, low, opts, backend="reference")
    assert ours.dtype == dtype
    our_error = (ours.double() - exact).abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    assert our_error <= 2 * eager_error + 1e-6, f"ours {our_error:.3g} vs eager {eager_error:.3g}"


# The CPU kernel packs the upsample operands of a large image in blocks of output rows (so that they stay
# in L2); the small option cases above fit in one block, so this one is sized to need 5 to 23 blocks of
# 2 to 5 rows, with stride 1 (the 1-D filter over whole blocks) and 2 (the per-row loops).
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_cpu_upsample_in_row_blocks(dtype, rtol, stride):
    sizes = (2, 16, 8, 45, 38, 3, 3)
    options = dict(pull="upsample", scale=2.0, stride=stride, padding=1, bias_in=True, alpha="vector", avg_kernel=3)
    inputs, opts = make_case(sizes, options, dtype, "cpu")
    assert_matches_reference("cpu", inputs, opts, rtol)
