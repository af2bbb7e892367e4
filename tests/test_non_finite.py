"""NaN and Inf propagate as in the reference (float64).

Output: the same positions are NaN / +Inf / -Inf, and the finite values agree to 1e-9 relative.
Gradients: finite at exactly the positions where the reference's are, and equal there (which
non-finite value a sum of infinities gives depends on the order of summation, so NaN vs +-Inf in
a gradient is not compared). A NaN or Inf reaching the layer must never come out as a finite
number: a silently wrong loss.
"""

import hardening_results
import pytest
import torch
from agreement import random_grad_output
from cases import call, case_params, make_case

from pushpull_ext import push_pull_conv2d

NON_FINITE_CASES = case_params(
    "2020-default", "2020-scale1-dilation", "2020-dual", "2024-stem", "2024-avg5-groups-biases"
)
# (tensor, value, image): one element of that tensor (of that image, for the input) is replaced by the
# value. A poisoned LAST image: the CPU's per-image routes test each image as they reach it, so the clean
# images before it are already written when they find it, and the batch must be redone on the exact route.
POISONS = [
    ("input", float("nan"), 0),
    ("input", float("inf"), 0),
    ("input", -float("inf"), 0),
    ("weight", float("nan"), 0),
    ("input", float("inf"), -1),
]


def _poisoned(sizes, options, device, target, value, image):
    inputs, opts = make_case(sizes, options, torch.float64, device)
    with torch.no_grad():
        t = inputs[target]
        t[(image,) + (0,) * (t.dim() - 3) + (t.shape[-2] // 2, t.shape[-1] // 2)] = value
    return inputs, opts


def _output_and_grads(backend, inputs, opts):
    out = call(push_pull_conv2d, inputs, opts, backend=backend)
    leaves = [t for t in inputs.values() if t.requires_grad]
    return [out, *torch.autograd.grad(out, leaves, random_grad_output(out, 3))]


def _assert_finite_values_close(actual, expected, finite, what):
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    torch.testing.assert_close(
        actual[finite],
        expected[finite],
        rtol=1e-9,
        atol=1e-9 * max(scale, 1e-30),
        msg=lambda m: f"{what}, finite positions: {m}",
    )


def _assert_same_non_finite(actual, expected, what, kinds):
    for kind, test in kinds:
        mismatch = (test(actual) != test(expected)).sum().item()
        assert mismatch == 0, (
            f"{what}: {kind} at {mismatch} positions where the reference differs "
            f"(ours {test(actual).sum().item()}, reference {test(expected).sum().item()})"
        )
    _assert_finite_values_close(actual, expected, torch.isfinite(expected), what)


OUTPUT_KINDS = (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf))
GRADIENT_KINDS = (("non-finite", lambda t: ~torch.isfinite(t)),)

# Known deviations, (backend, pull, poison) -> (reason, strict). Strict ones are reported to be fixed:
# they fail the suite (XPASS) once fixed, so that the entry is removed.
_INVERT_INF = (
    "the invert fast path computes the pull response as max_plus_min * box_sum(x) - conv2d(x, k) "
    "(README, section How it is fast): an Inf input gives Inf - Inf = NaN where conv2d(x, q(k)) gives +-Inf"
)
KNOWN_DEVIATIONS = {
    ("triton", "invert", "inf"): (f"Triton: {_INVERT_INF}", True),
}


def _xfail_known_deviation(request, backend, options, value):
    kind = "inf" if value in (float("inf"), -float("inf")) else "nan"
    known = KNOWN_DEVIATIONS.get((backend, options["pull"], kind))
    if known is not None:
        request.applymarker(pytest.mark.xfail(reason=known[0], strict=known[1]))


def _poison_id(target, value, image):
    return f"{value}-in-{target}" + ("-last-image" if image == -1 else "")


POISON_PARAMS = [pytest.param(*p, id=_poison_id(*p)) for p in POISONS]


def poisoned_results(backend, device, sizes, options, target, value, image):
    """Output and gradients of `backend` and of the reference for the case with one element poisoned,
    and the names of the gradients."""
    inputs, opts = _poisoned(sizes, options, device, target, value, image)
    ours = _output_and_grads(backend, inputs, opts)
    expected = _output_and_grads("reference", inputs, opts)
    return ours, expected, [f"gradient of {k}" for k, v in inputs.items() if v.requires_grad]


def assert_propagation_as_in_the_reference(ours, expected, names):
    assert not torch.isfinite(expected[0]).all(), "the poison must reach the reference's output"
    _assert_same_non_finite(ours[0], expected[0], "output", OUTPUT_KINDS)
    for name, a, e in zip(names, ours[1:], expected[1:]):
        _assert_same_non_finite(a, e, name, GRADIENT_KINDS)


@pytest.mark.parametrize("target, value, image", POISON_PARAMS)
@pytest.mark.parametrize("sizes, options", NON_FINITE_CASES)
def test_nan_and_inf_propagate_as_in_the_reference(request, fused_backend_device, sizes, options, target, value, image):
    backend, device = fused_backend_device
    _xfail_known_deviation(request, backend, options, value)
    results = poisoned_results(backend, device, sizes, options, target, value, image)
    hardening_results.count("bad_inputs", f"{backend}-{device}")
    assert_propagation_as_in_the_reference(*results)
