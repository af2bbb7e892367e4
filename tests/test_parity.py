"""Drop-in parity with nn.Conv2d: what PyTorch users do with a convolution layer, on every backend.

Forward-mode AD, torch.func transforms (vmap, grad, jacrev, jacfwd, hessian, functional_call), double
backward, unbatched input, torch.jit.trace, torch.compile(dynamic=True, fullgraph=True), padding_mode and
padding="same" with an even kernel. Derivatives are checked against PyTorch's own autograd of the reference
formula in float64; padding modes against two nn.Conv2d layers with that padding mode.
"""

import warnings

import pytest
import torch
from agreement import gradcheck, gradgradcheck
from cases import (
    CASE_PARAMS,
    call,
    case,
    case_params,
    make_case,
    skip_the_wide_case_under_the_interpreter,
    skip_under_the_interpreter_unless,
)
from torch import nn
from torch._dynamo.utils import counters
from torch.autograd import forward_ad

from pushpull_ext import PushPullConv2d, convert, pull_kernel, push_pull_conv2d
from pushpull_ext.reference import combine

F64 = torch.float64
# A few cases for the slower checks (the interpreter runs the Triton kernels on the CPU).
FEW_NAMES = ("2020-default", "2024-stem", "2024-dual-avg3")
FEW = case_params(*FEW_NAMES)


def _fn(backend, names, opts):
    """f(*tensors) = push_pull_conv2d of the case, tensors in the order of `names`."""
    return lambda *tensors: call(push_pull_conv2d, dict(zip(names, tensors)), opts, backend=backend)


def _case(sizes, options, device, requires_grad=True):
    inputs, opts = make_case(sizes, options, F64, device, requires_grad=requires_grad)
    return list(inputs), tuple(inputs.values()), opts


def _close(actual, expected, what=""):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------- forward-mode AD


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_jvp_equals_autograd_of_the_formula(backend_device, sizes, options):
    """torch.func.jvp with respect to every input at once (input, weight through the pull kernel,
    biases, alpha): equal to the reference's, and never zero where the reference's is not."""
    backend, device = backend_device
    names, primals, opts = _case(sizes, options, device, requires_grad=False)
    tangents = tuple(torch.randn_like(t) for t in primals)
    out, tangent = torch.func.jvp(_fn(backend, names, opts), primals, tangents)
    ref_out, ref_tangent = torch.func.jvp(_fn("reference", names, opts), primals, tangents)
    _close(out, ref_out, "output")
    assert ref_tangent.abs().max() > 0
    _close(tangent, ref_tangent, "tangent")


@pytest.mark.parametrize("sizes, options", FEW)
def test_forward_ad_dual_tensors(backend_device, sizes, options):
    """The torch.autograd.forward_ad API, one input at a time."""
    backend, device = backend_device
    names, primals, opts = _case(sizes, options, device, requires_grad=False)
    for index, name in enumerate(names):
        tangent = torch.randn_like(primals[index])
        results = []
        for run in (backend, "reference"):
            with forward_ad.dual_level():
                duals = [forward_ad.make_dual(t, tangent) if i == index else t for i, t in enumerate(primals)]
                results.append(forward_ad.unpack_dual(_fn(run, names, opts)(*duals)).tangent)
        assert results[0] is not None, f"no tangent for {name}"
        _close(results[0], results[1], f"tangent of {name}")


def test_jacfwd_and_jacrev_equal_the_reference(backend_device):
    backend, device = backend_device
    sizes, options = case("2024-avg5-groups-biases")
    names, primals, opts = _case((1, 4, 2, 5, 5, 3, 3), options, device, requires_grad=False)
    for transform in (torch.func.jacfwd, torch.func.jacrev):
        for argnum in (0, 1):  # input, weight
            ours = transform(_fn(backend, names, opts), argnums=argnum)(*primals)
            expected = transform(_fn("reference", names, opts), argnums=argnum)(*primals)
            _close(ours, expected, f"{transform.__name__} w.r.t. {names[argnum]}")


# ---------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("sizes, options", FEW)
def test_vmap_over_inputs_and_weights_uses_batching_rules(backend_device, sizes, options):
    backend, device = backend_device
    names, primals, opts = _case(sizes, options, device, requires_grad=False)
    fn, ref = _fn(backend, names, opts), _fn("reference", names, opts)
    x, w, rest = primals[0], primals[1], primals[2:]
    xs, ws = torch.stack([x, 2 * x, -x]), torch.stack([w, 0.5 * w, w.flip(-1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the slow per-sample fallback warns: no fallback here
        over_inputs = torch.func.vmap(lambda xi: fn(xi, w, *rest))(xs)
        over_weights = torch.func.vmap(lambda wi: fn(x, wi, *rest))(ws)
    for i in range(3):
        _close(over_inputs[i], ref(xs[i], w, *rest), f"vmap over inputs, item {i}")
        _close(over_weights[i], ref(x, ws[i], *rest), f"vmap over weights, item {i}")


def test_func_grad_functional_call_and_hessian(backend_device):
    """Per-parameter gradients through functional_call, as in per-sample-gradient and meta-learning code."""
    backend, device = backend_device
    torch.manual_seed(0)
    layers = {
        run: PushPullConv2d(
            3, 4, 3, padding=1, pull="invert", avg_kernel=3, bias_out=True, train_alpha=True, backend=run
        ).to(device, F64)
        for run in (backend, "reference")
    }
    layers["reference"].load_state_dict(layers[backend].state_dict())
    params = {k: v.detach() for k, v in layers[backend].named_parameters()}
    x = torch.randn(2, 3, 6, 6, device=device, dtype=F64)

    def loss(run, p, xi):
        return torch.func.functional_call(layers[run], p, (xi,)).square().sum()

    grads = torch.func.grad(lambda p: loss(backend, p, x))(params)
    expected = torch.func.grad(lambda p: loss("reference", p, x))(params)
    for name in params:
        _close(grads[name], expected[name], f"grad of {name}")
    per_sample = torch.func.vmap(torch.func.grad(lambda p, xi: loss(backend, p, xi[None])), in_dims=(None, 0))(
        params, x
    )
    _close(per_sample["weight"].sum(0), expected["weight"], "per-sample gradients summed")
    alpha_hessian = torch.func.hessian(lambda a: loss(backend, {**params, "alpha": a}, x))(params["alpha"])
    expected_hessian = torch.func.hessian(lambda a: loss("reference", {**params, "alpha": a}, x))(params["alpha"])
    _close(alpha_hessian, expected_hessian, "hessian w.r.t. alpha")


# ---------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_gradgradcheck(backend_device, request, sizes, options):
    backend, device = backend_device
    # The second derivatives are autograd of the formula with the forward's masks (ops.py
    # _differentiable_grads): only the forward and its masks are the backend's.
    kept = request.node.callspec.id.split("-", 2)[-1] in FEW_NAMES
    skip_under_the_interpreter_unless(backend, device, kept, "its double backward is ATen's but for the masks")
    names, inputs, opts = _case(sizes, options, device)
    # Fast mode (random projections of the second-order Jacobians): full ones take minutes per case.
    assert gradgradcheck(_fn(backend, names, opts), inputs, fast_mode=True)


@pytest.mark.parametrize("sizes, options", FEW)
def test_gradient_penalty_step_equals_reference(backend_device, sizes, options):
    """loss + |d loss / d input|^2 (WGAN-GP, input-gradient regularization): one step's gradients."""
    backend, device = backend_device
    names, inputs, opts = _case(sizes, options, device)

    def step(run):
        out = _fn(run, names, opts)(*inputs)
        loss = out.square().mean()
        (grad_x,) = torch.autograd.grad(loss, inputs[0], create_graph=True)
        return torch.autograd.grad(loss + grad_x.square().sum(), inputs)

    for name, ours, expected in zip(names, step(backend), step("reference")):
        _close(ours, expected, f"gradient-penalty gradient of {name}")


def test_first_order_backward_builds_no_graph(fused_backend_device):
    """Without create_graph the gradients come from the fused backward op, with no autograd history."""
    backend, device = fused_backend_device
    names, inputs, opts = _case(*case("2024-stem"), device)
    grads = torch.autograd.grad(_fn(backend, names, opts)(*inputs).sum(), inputs)
    assert all(g.grad_fn is None for g in grads)


# ---------------------------------------------------------------------------- unbatched input


@pytest.mark.parametrize("sizes, options", CASE_PARAMS)
def test_unbatched_input(backend_device, request, sizes, options):
    backend, device = backend_device
    skip_the_wide_case_under_the_interpreter(backend, device, request, "the batch dimension is the launcher's")
    names, inputs, opts = _case(sizes, options, device)
    fn = _fn(backend, names, opts)
    single = inputs[0][0].detach().requires_grad_()
    out = fn(single, *inputs[1:])
    batched = fn(single[None], *inputs[1:])
    assert out.shape == batched.shape[1:]
    _close(out, batched[0], "output")
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (single, *inputs[1:]), grad_out)
    expected = torch.autograd.grad(batched, (single, *inputs[1:]), grad_out[None])
    for name, g, e in zip(names, ours, expected):
        assert g.shape == e.shape
        _close(g, e, f"grad of {name}")


# ---------------------------------------------------------------------------- tracing and compiling


def test_jit_trace_with_checks_and_trained_after_a_no_grad_trace(backend_device):
    backend, device = backend_device
    layer = PushPullConv2d(
        3, 4, 3, padding=1, pull="invert", avg_kernel=3, bias_out=True, train_alpha=True, backend=backend
    ).to(device, F64)
    x = torch.randn(2, 3, 7, 7, device=device, dtype=F64)
    traced = torch.jit.trace(layer, x)  # check_trace=True: runs it again and compares the graphs
    _close(traced(x), layer(x), "traced output")
    with torch.no_grad():
        traced_no_grad = torch.jit.trace(layer, x)
    traced_no_grad(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    layer(x).square().sum().backward()
    for name, p in layer.named_parameters():
        _close(grads[name], p.grad, f"grad of {name} through the no_grad trace")


@pytest.mark.parametrize(
    "options",
    [dict(pull="upsample", bias=True), dict(pull="invert", avg_kernel=3, bias_out=True, train_alpha=True)],
    ids=["2020", "2024"],
)
def test_compile_dynamic_fullgraph_one_graph(fused_backend_device, options, request):
    """torch.compile(dynamic=True, fullgraph=True) with Inductor: one graph for several batch and image
    sizes, training and eager numbers."""
    backend, device = fused_backend_device
    # Under the interpreter the Triton ops are opaque custom ops with the C++ op's fake kernels and autograd
    # (ops.py): the graph is the CPU kernel's, for both layers. One layer runs there (the 2020 one's eight
    # interpreted training steps took a minute and a half); on a GPU, where they are traced triton_ops, both.
    kept = request.node.callspec.id.endswith("2024")
    skip_under_the_interpreter_unless(backend, device, kept, "its graph and fake kernels are the CPU op's")
    layer = PushPullConv2d(3, 4, 3, padding=1, backend=backend, **options).to(device)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    # Non-square first: duck sizing would otherwise specialize height == width (for nn.Conv2d too).
    for batch, height, width in ((2, 8, 9), (3, 8, 9), (2, 10, 12), (4, 9, 7)):
        x = torch.randn(batch, 3, height, width, device=device)
        out = compiled(x)
        out.square().sum().backward()
        compiled_grad = layer.weight.grad
        layer.weight.grad = None
        expected = layer(x)
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled_grad, layer.weight.grad, rtol=1e-4, atol=1e-5)
        layer.weight.grad = None
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# ---------------------------------------------------------------------------- padding


def _two_conv2d_oracle(x, layer: PushPullConv2d):
    """The layer's formula with each convolution an nn.Conv2d of the layer's padding_mode and padding."""
    w = layer.weight
    q = pull_kernel(w, layer.pull, layer.scale)
    kernel_growth = [(a - b) // 2 for a, b in zip(q.shape[2:], w.shape[2:])]
    padding = (
        layer.padding if isinstance(layer.padding, str) else tuple(p + g for p, g in zip(layer.padding, kernel_growth))
    )
    pull_bias = None if layer.bias is None else -layer.bias
    responses = []
    for kernel, bias, pad in ((w, layer.bias, layer.padding), (q, pull_bias, padding)):
        conv = nn.Conv2d(
            w.shape[1] * layer.groups,
            w.shape[0],
            tuple(kernel.shape[2:]),
            layer.stride,
            pad,
            layer.dilation,
            layer.groups,
            bias is not None,
            layer.padding_mode,
        ).to(x)
        responses.append(
            torch.func.functional_call(
                conv, {"weight": kernel, "bias": bias} if bias is not None else {"weight": kernel}, (x,)
            )
        )
    alpha = torch.full((w.shape[0],), layer.alpha_value, dtype=x.dtype, device=x.device)
    return combine(*responses, layer.bias_out, alpha, layer.avg_kernel, layer.dual_output)


PADDED_LAYERS = {
    "2020": dict(kernel_size=3, padding=1, pull="upsample"),
    "2020-stride-groups-rect": dict(kernel_size=(3, 5), stride=2, padding=(2, 1), groups=2, pull="upsample", scale=1.5),
    "2020-scale1": dict(kernel_size=3, padding=1, pull="upsample", scale=1.0, dilation=2),
    "2024-pp3": dict(kernel_size=3, padding=1, pull="invert", avg_kernel=3, bias_out=True),
    "2024-dual": dict(kernel_size=3, padding=2, pull="invert", dual_output=True, bias=False),
}


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("layer_options", PADDED_LAYERS.values(), ids=PADDED_LAYERS.keys())
def test_padding_mode_is_each_convolution_as_conv2d(backend_device, mode, layer_options):
    backend, device = backend_device
    # A padding mode is F.pad before the fused op (functional.py), the same for every backend: under the
    # interpreter "reflect" (F.pad, the kernel does not pad) stands for the others, and "zeros" is the kernel's
    # own padding, as in every case of the agreement grid. With F.pad, upsample's push kernel runs embedded in
    # the 7 x 7 pull window (49 taps, minutes under the interpreter for the 3 x 3 "2020" layer): the
    # rectangular layer's 5 x 7 window checks that embedding.
    kept = mode == "reflect" and layer_options is not PADDED_LAYERS["2020"]
    skip_under_the_interpreter_unless(backend, device, kept, "a padding mode is F.pad")
    layer = PushPullConv2d(4, 6, padding_mode=mode, alpha=0.7, backend=backend, **layer_options).to(device, F64)
    x = torch.randn(2, 4, 9, 8, device=device, dtype=F64, requires_grad=True)
    _close(layer(x), _two_conv2d_oracle(x, layer), "output")
    assert gradcheck(
        lambda x, w: torch.func.functional_call(layer, {"weight": w}, (x,)), (x, layer.weight), fast_mode=True
    )


@pytest.mark.parametrize("kernel_size", [4, (2, 3)])
@pytest.mark.parametrize(
    "pull", [dict(pull="invert", avg_kernel=3), dict(pull="upsample", scale=1.0)], ids=["invert", "upsample-scale1"]
)
def test_same_padding_with_an_even_kernel_pads_as_conv2d(backend_device, kernel_size, pull):
    backend, device = backend_device
    layer = PushPullConv2d(4, 6, kernel_size, padding="same", dilation=(1, 2), backend=backend, **pull).to(device, F64)
    x = torch.randn(2, 4, 9, 8, device=device, dtype=F64, requires_grad=True)
    out = layer(x)
    assert out.shape[2:] == x.shape[2:]
    _close(out, _two_conv2d_oracle(x, layer), "output")
    assert gradcheck(layer, (x,), fast_mode=True)


def test_convert_keeps_padding_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU()).double()
    convert(model, "pp", pull="invert")
    assert isinstance(model[0], PushPullConv2d) and model[0].padding_mode == "reflect"
    x = torch.randn(1, 3, 6, 6, dtype=F64)
    _close(model[0](x), _two_conv2d_oracle(x, model[0]), "converted layer")
    assert "padding_mode='reflect'" in repr(model[0])
