"""Outputs and gradients of a backend against the reference in float64, judged by relative error: the
check the agreement tests (and the CUDA emulation's) run on every case."""

import torch
from cases import call

from pushpull_ext import push_pull_conv2d


def outputs_and_grads(backend, inputs, opts, grad_seed=1):
    """(output, [gradient of each input that requires grad]) for a fixed random grad_output."""
    out = call(push_pull_conv2d, inputs, opts, backend=backend)
    leaves = [t for t in inputs.values() if t.requires_grad]
    if not leaves:
        return out, []
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, list(grads)


def reference_float64(inputs, opts):
    as64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    return outputs_and_grads("reference", as64, opts)


def assert_rel_close(actual, expected, rtol, what):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=rtol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}"
    )


def assert_matches_reference(backend, inputs, opts, rtol):
    """The output and every gradient of `backend` within rtol (relative to each tensor's largest value)
    of the float64 reference's."""
    out, grads = outputs_and_grads(backend, inputs, opts)
    ref_out, ref_grads = reference_float64(inputs, opts)
    assert_rel_close(out, ref_out, rtol, "output")
    names = [name for name, t in inputs.items() if t.requires_grad]
    for name, g, r in zip(names, grads, ref_grads):
        assert_rel_close(g, r, rtol, f"grad of {name}")
