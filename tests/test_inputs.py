"""Bad input gets a clear error naming the argument; odd but valid layouts get the right answer."""

import hardening_results
import pytest
import torch
from layouts import keeps_channels_last

from pushpull_ext import push_pull_conv2d


def _ok(device, dtype=torch.float64):
    return torch.randn(2, 4, 8, 8, device=device, dtype=dtype), torch.randn(6, 4, 3, 3, device=device, dtype=dtype)


BAD_INPUTS = [
    ("2-D input", lambda x, w: dict(input=x[0, 0], weight=w), ValueError, r"input must be 3-D \[C_in, H, W\] or 4-D"),
    (
        "padding mode",
        lambda x, w: dict(input=x, weight=w, padding_mode="mirror"),
        ValueError,
        "padding_mode must be one of",
    ),
    (
        "reflect padding too wide",
        lambda x, w: dict(input=x[:, :, :3, :3], weight=w, padding=1, padding_mode="reflect"),
        ValueError,
        "pads the input by 3 .* its height is 3",
    ),
    ("2-D weight", lambda x, w: dict(input=x, weight=w[:, :, 0, 0]), ValueError, "weight must be 4-D"),
    ("channels", lambda x, w: dict(input=x[:, :3], weight=w), ValueError, "weight expects 4 input channels"),
    ("groups", lambda x, w: dict(input=x, weight=w[:, :2], groups=3), ValueError, "groups=3 must divide"),
    ("groups zero", lambda x, w: dict(input=x, weight=w, groups=0), ValueError, "groups must be a positive int"),
    ("integer input", lambda x, w: dict(input=x.long(), weight=w), TypeError, "input must be a floating-point"),
    ("mixed dtypes", lambda x, w: dict(input=x, weight=w.float()), TypeError, "weight has dtype torch.float32"),
    ("devices", lambda x, w: dict(input=x, weight=w.to("meta")), ValueError, "weight is on meta"),
    ("kernel too big", lambda x, w: dict(input=x[:, :, :2, :2], weight=w), ValueError, "larger than the padded input"),
    ("stride", lambda x, w: dict(input=x, weight=w, stride=0), ValueError, "stride must be positive"),
    ("dilation", lambda x, w: dict(input=x, weight=w, dilation=(1, -1)), ValueError, "dilation must be positive"),
    ("padding", lambda x, w: dict(input=x, weight=w, padding=-1), ValueError, "padding must be non-negative"),
    ("padding type", lambda x, w: dict(input=x, weight=w, padding=1.5), TypeError, "padding must be an int"),
    ("even kernel", lambda x, w: dict(input=x, weight=w[:, :, :2, :2]), ValueError, "even kernel size"),
    ("pull mode", lambda x, w: dict(input=x, weight=w, pull="push"), ValueError, "pull must be one of"),
    ("scale", lambda x, w: dict(input=x, weight=w, scale=0.5), ValueError, "scale must be a finite number >= 1"),
    ("avg even", lambda x, w: dict(input=x, weight=w, avg_kernel=4), ValueError, "avg_kernel must be odd"),
    (
        "avg negative",
        lambda x, w: dict(input=x, weight=w, avg_kernel=-3),
        ValueError,
        "avg_kernel must be a non-negative",
    ),
    (
        "alpha shape",
        lambda x, w: dict(input=x, weight=w, alpha=torch.ones(5, dtype=x.dtype, device=x.device)),
        ValueError,
        r"alpha must be a number or a tensor of shape \[\] or \[6\]",
    ),
    ("alpha type", lambda x, w: dict(input=x, weight=w, alpha="strong"), TypeError, "alpha must be a number"),
    (
        "bias shape",
        lambda x, w: dict(input=x, weight=w, bias=torch.ones(5, dtype=x.dtype, device=x.device)),
        ValueError,
        r"bias must have shape \[6\]",
    ),
    (
        "dual with bias_out",
        lambda x, w: dict(input=x, weight=w, dual_output=True, bias_out=torch.ones(6, dtype=x.dtype, device=x.device)),
        ValueError,
        "bias_out cannot be used with dual_output",
    ),
    (
        "upsample dilation",
        lambda x, w: dict(input=x, weight=w, dilation=2, padding=2),
        ValueError,
        "different shape than the push response",
    ),
    ("backend", lambda x, w: dict(input=x, weight=w, backend="fastest"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("make, error, match", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_is_refused_with_a_clear_error(backend_device, make, error, match):
    backend, device = backend_device
    x, w = _ok(device)
    kwargs = make(x, w)
    kwargs.setdefault("backend", backend)
    with pytest.raises(error, match=match):
        push_pull_conv2d(**kwargs)
    hardening_results.count("bad_inputs", f"{backend}-{device}")


@pytest.mark.parametrize(
    "good, bad, error, match",
    [
        (dict(stride=1), dict(stride=True), TypeError, "stride must be an int"),
        (dict(groups=1), dict(groups=True), ValueError, "groups must be a positive int"),
        (dict(padding=(1, 1)), dict(padding=(1, True)), TypeError, "padding must be an int"),
        (dict(avg_kernel=1), dict(avg_kernel=True), ValueError, "avg_kernel must be a non-negative int"),
    ],
    ids=["stride", "groups", "padding", "avg_kernel"],
)
def test_an_argument_equal_to_an_accepted_one_is_still_refused(good, bad, error, match):
    """Eager calls reuse the checks of an earlier call with the same arguments: True == 1, but only 1 is a
    valid stride, so a call with True after one with 1 must still be refused."""
    x, w = _ok("cpu")
    push_pull_conv2d(x, w, backend="reference", **good)
    with pytest.raises(error, match=match):
        push_pull_conv2d(x, w, backend="reference", **bad)


def test_a_number_alpha_first_seen_in_inference_mode_still_trains():
    """The checks' result, alpha's vector included, is reused by later calls: made under inference_mode, it
    must still be a tensor autograd can save when the next call trains."""
    x, w = _ok("cpu")
    w.requires_grad_()
    with torch.inference_mode():
        push_pull_conv2d(x, w, alpha=0.625, backend="reference")
    out = push_pull_conv2d(x, w, alpha=0.625, backend="reference")
    (grad,) = torch.autograd.grad(out.sum(), w)
    assert torch.isfinite(grad).all()


def test_backend_that_cannot_run_names_what_is_missing():
    x, w = _ok("cpu")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the cuda backend may run")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
        push_pull_conv2d(x, w, backend="cuda")


def test_direct_op_call_with_inconsistent_tensors_raises(fused_backend_device):
    """torch.ops.pushpull.* checks shapes itself (no out-of-bounds read when called directly): the C++ ops in
    csrc/pushpull.cpp, the Triton ops in pushpull_ext/op_checks.py."""
    backend, device = fused_backend_device
    prefix = "triton_" if backend == "triton" else ""
    forward, backward = (getattr(torch.ops.pushpull, prefix + name) for name in ("forward", "backward"))
    x, w = (t.to(device) for t in _ok("cpu"))
    geometry = ([1, 1], [1, 1], [1, 1], [1, 1], 1, 0, False)
    with pytest.raises(RuntimeError, match=r"alpha must have shape \[6\]"):
        forward(x, w, None, None, None, None, None, torch.ones(5, dtype=x.dtype, device=device), *geometry, False)
    with pytest.raises(RuntimeError, match="do not match"):
        forward(
            x, w[:, :2], None, None, None, None, None, torch.ones(6, dtype=x.dtype, device=device), *geometry, False
        )
    rows = torch.ones(7, 2, dtype=x.dtype, device=device)
    with pytest.raises(RuntimeError, match=r"pull_rows must have shape \[q, 3\]"):
        forward(x, w, None, rows, rows, None, None, torch.ones(6, dtype=x.dtype, device=device), *geometry, False)
    alpha = torch.ones(6, dtype=x.dtype, device=device)
    out, masks = forward(x, w, None, None, None, None, None, alpha, *geometry, True)
    with pytest.raises(RuntimeError, match="masks must be the uint8 tensor"):
        backward(out, x, w, None, None, None, None, alpha, masks[:1], *geometry, [True] * 6)
    with pytest.raises(RuntimeError, match="grad_output"):
        backward(out[:, :3], x, w, None, None, None, None, alpha, masks, *geometry, [True] * 6)


LAYOUT_OPTIONS = [dict(pull="upsample", padding=1), dict(pull="invert", padding=1, avg_kernel=3, stride=2)]


@pytest.mark.parametrize("options", LAYOUT_OPTIONS, ids=["2020", "2024"])
def test_empty_batch_gives_empty_output_and_gradients(backend_device, options):
    backend, device = backend_device
    x = torch.randn(0, 4, 8, 8, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    out = push_pull_conv2d(x, w, backend=backend, **options)
    expected = push_pull_conv2d(x, w, backend="reference", **options)
    assert out.shape == expected.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("options", LAYOUT_OPTIONS, ids=["2020", "2024"])
def test_non_contiguous_inputs(backend_device, layout, options):
    backend, device = backend_device
    base = torch.randn(2, 4, 9, 18, device=device, dtype=torch.float64)
    x = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": base[:, :, :, ::2],
        "transposed": base[:, :, :, :9].transpose(2, 3),
    }[layout]
    w = torch.randn(3, 3, 4, 6, device=device, dtype=torch.float64).permute(3, 2, 0, 1)  # non-contiguous weight
    x.requires_grad_(True)
    out = push_pull_conv2d(x, w, backend=backend, **options)
    expected = push_pull_conv2d(x.detach().contiguous(), w.contiguous(), backend="reference", **options)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    if layout == "channels_last" and keeps_channels_last(backend, device, x.dtype):
        assert out.is_contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    (expected_grad,) = torch.autograd.grad(
        push_pull_conv2d(x, w.contiguous(), backend="reference", **options), x, torch.ones_like(out)
    )
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)
