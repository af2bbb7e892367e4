"""With torch.use_deterministic_algorithms(True), every backend's forward and backward are bitwise
reproducible from run to run, or raise the error PyTorch's own ops raise in that mode."""

import re

import hardening_results
import pytest
import torch
from agreement import random_grad_output
from cases import call, case, make_case

from pushpull_ext import push_pull_conv2d

DETERMINISM_CASES = ("2020-default", "2020-wide-groups-stride-avg3", "2024-stem", "2024-avg5-groups-biases")
INTERPRETER_CASES = ("2020-default", "2024-stem")  # the rest takes ~30 s each under the Triton interpreter
# What PyTorch raises for an op without a deterministic implementation, or for cuBLAS without
# CUBLAS_WORKSPACE_CONFIG set.
PYTORCH_DETERMINISM_ERROR = r"does not have a deterministic implementation|CUBLAS_WORKSPACE_CONFIG"


@pytest.fixture
def deterministic_algorithms():
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    # At least two intra-op threads, so that the CPU kernels' parallel loops run split even where pytest-xdist
    # gave this worker one (tests/conftest.py): a race between threads is what this test exists to catch.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _forward_backward(backend, inputs, opts):
    out = call(push_pull_conv2d, inputs, opts, backend=backend)
    leaves = [t for t in inputs.values() if t.requires_grad]
    return [out, *torch.autograd.grad(out, leaves, random_grad_output(out, 5))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", DETERMINISM_CASES)
def test_backward_is_bitwise_reproducible(backend_device, deterministic_algorithms, name, dtype):
    backend, device = backend_device
    interpreted = backend == "triton" and device == "cpu"
    if interpreted and name not in INTERPRETER_CASES:
        pytest.skip("too slow under the Triton interpreter; runs on GPUs")
    sizes, options = case(name)
    # Larger maps where it is cheap: more parallel work and, on GPUs, split reductions.
    inputs, opts = make_case(sizes, options, dtype, device, scale_hw=1 if interpreted else 4)
    try:
        first = _forward_backward(backend, inputs, opts)
    except RuntimeError as error:
        assert re.search(PYTORCH_DETERMINISM_ERROR, str(error)), f"not PyTorch's determinism error: {error}"
        hardening_results.count("determinism", f"{backend}-{device}-raises")
        return
    second = _forward_backward(backend, inputs, opts)
    names = ["output"] + [f"gradient of {k}" for k, v in inputs.items() if v.requires_grad]
    for name, a, b in zip(names, first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    hardening_results.count("determinism", f"{backend}-{device}-reproducible")
