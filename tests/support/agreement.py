"""Outputs and gradients of a backend against the reference in float64, judged by relative error: the
check the agreement tests (and the CUDA emulation's) run on every case. Also the rules such checks need on
a GPU: a grad_output on the output's device, and gradcheck's tolerance for backward passes that sum in
another order from run to run."""

import torch
from cases import call

from pushpull_ext import push_pull_conv2d

# On a GPU two runs of a backward may differ by the order of their sums: cuDNN's convolution backward (the
# reference's autograd, the CUDA backend's input and weight gradients, every backend's double backward, which
# is autograd of the formula) may use atomics. gradcheck's reentrancy check runs the backward twice and
# compares exactly unless given nondet_tol (PyTorch's own OpInfo tests pass gradcheck_nondet_tol = 1e-12
# for such ops): a float64 sum in another order differs by ~1e-16 of its size.
GPU_NONDET_TOL = 1e-12


def random_grad_output(out, seed):
    """A fixed random grad_output for `out`: drawn in float64 on the CPU from `seed` (the same numbers on
    every device, as shapes.make_inputs draws the inputs), on out's device in out's dtype."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)


def outputs_and_grads(backend, inputs, opts, grad_seed=1):
    """(output, [gradient of each input that requires grad]) for a fixed random grad_output."""
    out = call(push_pull_conv2d, inputs, opts, backend=backend)
    leaves = [t for t in inputs.values() if t.requires_grad]
    if not leaves:
        return out, []
    grads = torch.autograd.grad(out, leaves, random_grad_output(out, grad_seed))
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


def nondet_tol(tensors) -> float:
    """gradcheck's nondet_tol for `tensors`: GPU_NONDET_TOL on a GPU, none (exact reentrancy) on the CPU."""
    on_gpu = any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
    return GPU_NONDET_TOL if on_gpu else 0.0


def gradcheck(fn, inputs, **options):
    """torch.autograd.gradcheck with nondet_tol(inputs)."""
    return torch.autograd.gradcheck(fn, inputs, nondet_tol=nondet_tol(inputs), **options)


def gradgradcheck(fn, inputs, **options):
    """torch.autograd.gradgradcheck with nondet_tol(inputs)."""
    return torch.autograd.gradgradcheck(fn, inputs, nondet_tol=nondet_tol(inputs), **options)


def gradcheck_jointly(fn, inputs, **options):
    """gradcheck's fast mode of fn(*inputs) taken as a function of ONE vector holding every tensor of
    `inputs` (None entries pass through): its random projections v^T J u then cost two evaluations of fn in
    all, not two per input (the Triton interpreter's minutes), while a wrong gradient of any input still
    changes v^T J u for random u and v. The check of fn's own inputs one by one is gradcheck's. No
    undefined-gradient check (a backward given None): that is ops.py's autograd, one for every backend,
    which the CPU kernel's full gradcheck runs."""
    tensors = [t for t in inputs if t is not None]
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).requires_grad_(True)

    def of_flat(vector):
        parts = (p.view(t.shape) for p, t in zip(torch.split(vector, [t.numel() for t in tensors]), tensors))
        return fn(*[None if t is None else next(parts) for t in inputs])

    return gradcheck(of_flat, (flat,), fast_mode=True, check_undefined_grad=False, **options)
