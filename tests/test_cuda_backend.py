"""The CUDA backend where tests/conftest.py's agreement grid does not reach: the choice of it by
backend="auto" (runs anywhere), and on a GPU the direct pull path of large kernels, streams, empty
batches. The agreement grid itself (tests/test_agreement.py) runs with backend="cuda" on a GPU."""

import types

import pytest
import torch
from agreement import GPU_NONDET_TOL, assert_matches_reference, assert_rel_close, outputs_and_grads
from cases import make_case
from test_cuda_emulation import LARGE_KERNEL, MANY_TILES

import pushpull_ext.functional as functional
from pushpull_ext._ext import has_cpp_kernel


def _cuda_tensor_stand_in():
    """resolve_backend reads only `.device`: a stand-in lets it be tested without a GPU."""
    return types.SimpleNamespace(device=torch.device("cuda", 0))


@pytest.mark.parametrize(
    "capability, triton_error, cuda_built, expected",
    [
        ((7, 0), None, True, "cuda"),  # V100: Triton needs compute capability >= 8.0
        ((7, 5), None, True, "cuda"),  # T4
        ((9, 0), None, True, "cuda"),  # H100: the CUDA extension first (functional.AUTO_GPU_BACKEND)
        ((9, 0), "no triton", True, "cuda"),  # H100 without Triton
        ((9, 0), None, False, "triton"),  # H100, the extension built without CUDA: Triton
    ],
)
def test_auto_takes_the_cuda_extension_else_triton(monkeypatch, capability, triton_error, cuda_built, expected):
    monkeypatch.delenv("PUSHPULL_BACKEND", raising=False)
    monkeypatch.setattr(functional, "CPP_ERROR", None)
    monkeypatch.setattr(functional, "has_cpp_kernel", lambda device_type: cuda_built)
    monkeypatch.setattr(functional.ops, "TRITON_OP_ERROR", triton_error)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert functional.resolve_backend("auto", _cuda_tensor_stand_in()) == expected


def test_cuda_backend_missing_names_the_fix(monkeypatch):
    monkeypatch.setattr(functional, "CPP_ERROR", None)
    monkeypatch.setattr(functional, "has_cpp_kernel", lambda device_type: False)
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1"):
        functional.resolve_backend("cuda", _cuda_tensor_stand_in())


needs_cuda_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_cpp_kernel("cuda")),
    reason="needs a GPU and pushpull_ext._C built with its CUDA kernels",
)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["direct", "prefilter"])
def test_large_upsampled_kernel(dtype, rtol):  # float32: TF32 off (conftest.py)
    inputs, opts = make_case(*LARGE_KERNEL, dtype, "cuda")
    assert_matches_reference("cuda", inputs, opts, rtol)


@needs_cuda_kernels
def test_side_stream_gives_the_same_result():
    inputs, opts = make_case(
        (2, 4, 6, 17, 19, 3, 3), dict(pull="invert", padding=1, avg_kernel=5, bias_in=True), torch.float64, "cuda"
    )
    expected, expected_grads = outputs_and_grads("cuda", inputs, opts)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, grads = outputs_and_grads("cuda", inputs, opts)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, expected)
    # The gradients to the order of cuDNN's sums in the backward's ATen convolutions, which may change from
    # run to run (agreement.GPU_NONDET_TOL); a missed stream dependency would give other values.
    for g, e in zip(grads, expected_grads):
        assert_rel_close(g, e, GPU_NONDET_TOL, "gradient on a side stream")


@needs_cuda_kernels
def test_empty_batch():
    inputs, opts = make_case(
        (0, 4, 6, 7, 6, 3, 3), dict(pull="upsample", padding=1, avg_kernel=3, bias_in=True), torch.float32, "cuda"
    )
    out, grads = outputs_and_grads("cuda", inputs, opts)
    assert out.shape == (0, 6, 7, 6)
    assert all(g.abs().sum() == 0 for g in grads)


@needs_cuda_kernels
@pytest.mark.parametrize("sizes, options", MANY_TILES)
def test_many_tiles(sizes, options):
    inputs, opts = make_case(sizes, options, torch.float64, "cuda")
    assert_matches_reference("cuda", inputs, opts, 1e-9)
