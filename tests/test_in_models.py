"""The layer inside real models: inference keeps the pull operands, torch.compile / torch.export of a
whole converted ResNet, autocast, channels_last."""

import pytest
import torch
from layouts import keeps_channels_last
from paper_models import PPmodule2d, PushPullConv2DUnit, tiny_resnet
from torch import nn

import pushpull_ext
import pushpull_ext.functional
from pushpull_ext import PushPullConv2d, convert, push_pull_conv2d


@pytest.fixture
def derivations(monkeypatch):
    """Counts the derivations of pull operands from a push kernel."""
    calls = []
    derive = pushpull_ext.functional.pull_operands

    def counting(weight, args):
        calls.append(weight)
        return derive(weight, args)

    monkeypatch.setattr(pushpull_ext.functional, "pull_operands", counting)
    return calls


PULLS = [pytest.param(dict(pull="upsample"), id="2020"), pytest.param(dict(pull="invert", avg_kernel=3), id="2024")]


def _layer(backend, device, **options):
    return PushPullConv2d(3, 6, 3, padding=1, backend=backend, **options).to(device=device, dtype=torch.float64)


def _expected(layer, x):
    """The formula on the layer's current weights."""
    return push_pull_conv2d(
        x, layer.weight, layer.bias, padding=1, pull=layer.pull, avg_kernel=layer.avg_kernel, backend="reference"
    )


def _frozen_with_grad_enabled(layer):
    layer.weight.requires_grad_(False)
    return torch.enable_grad()


INFERENCE_CONTEXTS = [
    pytest.param(lambda layer: torch.no_grad(), id="no_grad"),
    pytest.param(lambda layer: torch.inference_mode(), id="inference_mode"),
    pytest.param(_frozen_with_grad_enabled, id="frozen-weights"),
]


@pytest.mark.parametrize("context", INFERENCE_CONTEXTS)
@pytest.mark.parametrize("options", PULLS)
def test_inference_derives_the_pull_operands_once(fused_backend_device, derivations, options, context):
    backend, device = fused_backend_device
    layer = _layer(backend, device, **options).eval()
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    with context(layer):
        outputs = [layer(x) for _ in range(3)]
    assert len(derivations) == 1
    for out in outputs:
        torch.testing.assert_close(out, _expected(layer, x), rtol=1e-9, atol=1e-9)


def _in_place_update(layer):
    with torch.no_grad():
        layer.weight.mul_(-2)


def _load_state_dict(layer):
    state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state)


def _new_parameter(layer):
    layer.weight = nn.Parameter(torch.randn_like(layer.weight))


def _data_assignment(layer):
    layer.weight.data = torch.randn_like(layer.weight)


def _dtype_change(layer):
    layer.float()


@pytest.mark.parametrize(
    "change", [_in_place_update, _load_state_dict, _new_parameter, _data_assignment, _dtype_change]
)
@pytest.mark.parametrize("options", PULLS)
def test_any_change_of_the_weights_derives_them_again(fused_backend_device, derivations, options, change):
    backend, device = fused_backend_device
    layer = _layer(backend, device, **options).eval()
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        change(layer)
        x = x.to(layer.weight.dtype)
        out = layer(x)
        layer(x)
    assert len(derivations) == 2
    tolerance = 1e-9 if x.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, _expected(layer, x), rtol=tolerance, atol=tolerance)


def test_clear_after_in_place_update_through_data(derivations):
    """`.data` has a version counter of its own: such an update needs clear_pull_cache()."""
    layer = PushPullConv2d(3, 6, 3, padding=1, pull="invert").double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        layer.weight.data.mul_(-2)
        pushpull_ext.clear_pull_cache()
        out = layer(x)
    assert len(derivations) == 2
    torch.testing.assert_close(out, _expected(layer, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("options", PULLS)
def test_training_derives_them_at_every_call(fused_backend_device, derivations, options):
    backend, device = fused_backend_device
    layer = _layer(backend, device, **options)
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    for module in (layer.train(), layer.eval()):  # eval with grad enabled: gradients still reach the weight
        module(x).sum().backward()
    assert len(derivations) == 2
    expected = torch.autograd.grad(_expected(layer, x).sum(), layer.weight)[0]
    torch.testing.assert_close(layer.weight.grad, 2 * expected, rtol=1e-9, atol=1e-9)


def test_operands_kept_in_inference_mode_serve_later_gradients(derivations):
    """Kept operands are normal tensors: a later call may save them for an input-gradient backward."""
    layer = PushPullConv2d(3, 6, 3, padding=1, pull="invert").eval().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.inference_mode():
        layer(x.detach())
    layer(x).sum().backward()
    assert len(derivations) == 1 and x.grad is not None


def test_interpolation_matrices_kept_from_inference_mode_serve_later_gradients(monkeypatch):
    """The bilinear matrices are built once and kept: one first asked for under inference_mode is still a
    normal tensor, which autograd may save (double backward runs the formula on it); gradients are the
    formula's."""
    monkeypatch.setattr(pushpull_ext.options, "_interpolation_matrices", {})
    with torch.inference_mode():
        kept = pushpull_ext.options.interpolation_matrix(3, 7, torch.float64, "cpu")
    assert not kept.is_inference()
    assert pushpull_ext.options.interpolation_matrix(3, 7, torch.float64, torch.device("cpu")) is kept
    layer = PushPullConv2d(3, 4, 3, padding=1, pull="upsample").double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    grad_x = torch.autograd.grad(layer(x).sum(), x, create_graph=True)[0]
    expected = torch.autograd.grad(_expected(layer, x).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(grad_x, expected, rtol=1e-9, atol=1e-9)
    grad_w = torch.autograd.grad((grad_x**2).sum(), layer.weight)[0]
    torch.testing.assert_close(grad_w, torch.autograd.grad((expected**2).sum(), layer.weight)[0], rtol=1e-9, atol=1e-9)


def test_converted_model_inference_derives_once_per_layer(derivations):
    model, replaced = convert(tiny_resnet(), "b1")
    model.eval()
    with torch.inference_mode():
        for _ in range(3):
            model(torch.randn(2, 3, 16, 16))
    assert len(derivations) == len(replaced)


# ---------------------------------------------------------------------------- compile and export


def _skip_interpreter(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("under the Triton interpreter the op is opaque to tracing, as the C++ op is: test_ops covers it")


def _converted_resnet(backend, device, **options):
    _skip_interpreter(backend, device)
    model, replaced = convert(tiny_resnet(), "b1", backend=backend, **options)
    return model.to(device=device, dtype=torch.float64), replaced


@pytest.mark.parametrize("options", PULLS)
def test_compile_whole_resnet_fullgraph(fused_backend_device, options):
    backend, device = fused_backend_device
    model, _ = _converted_resnet(backend, device, **options)
    x = torch.randn(2, 3, 16, 16, device=device, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    results = []
    for run in (model, compiled):  # fullgraph=True: a graph break raises
        model.zero_grad()
        out = run(x)
        out.square().sum().backward()
        results.append([out] + [p.grad for p in model.parameters()])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # inference: the compiled graph derives the operands itself
        torch.testing.assert_close(compiled.eval()(x), model(x), rtol=1e-9, atol=1e-9)


def test_export_whole_resnet_one_node_per_layer(fused_backend_device):
    backend, device = fused_backend_device
    model, replaced = _converted_resnet(backend, device, pull="invert", avg_kernel=3, bias_out=True)
    model.eval()
    x = torch.randn(2, 3, 16, 16, device=device, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("pushpull" in t for t in targets) == len(replaced), targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------- autocast

AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")]
if torch.cuda.is_available():
    AUTOCAST += [
        pytest.param("cuda", torch.float16, id="cuda-fp16"),
        pytest.param("cuda", torch.bfloat16, id="cuda-bf16"),
    ]

PAPER_LAYERS = [
    pytest.param(lambda: PPmodule2d(16, 32, 3, padding=1, train_alpha=True), id="2020"),
    pytest.param(lambda: PushPullConv2DUnit(16, 32, 3, padding=1, trainable_pull_inhibition=True), id="2024"),
]


def _output_and_grads(layer, x, grad_out, autocast, backward_inside):
    """(output, grad of x, grad of the push kernel) with the forward (and maybe backward) under autocast."""
    push_weight = {
        PushPullConv2d: lambda: layer.weight,
        PPmodule2d: lambda: layer.push.weight,
        PushPullConv2DUnit: lambda: layer.push_conv.weight,
    }[type(layer)]()
    x = x.detach().requires_grad_()
    with autocast:
        out = layer(x)
        if backward_inside:
            grads = torch.autograd.grad(out, (x, push_weight), grad_out.to(out.dtype))
    if not backward_inside:
        grads = torch.autograd.grad(out, (x, push_weight), grad_out.to(out.dtype))
    return (out, *grads)


def _error(value, exact):
    return (value.double() - exact).abs().max().item()


@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "backward-inside"])
@pytest.mark.parametrize("make_paper_layer", PAPER_LAYERS)
@pytest.mark.parametrize("device_type, dtype", AUTOCAST)
def test_autocast_like_conv2d(backend_device, device_type, dtype, make_paper_layer, backward_inside):
    """Runs in the autocast dtype with float32 parameters getting float32 gradients; output and gradients
    within twice the error of the papers' nn.Conv2d-based layer under the same autocast (vs float64)."""
    backend, device = backend_device
    if device != device_type or (backend == "triton" and device == "cpu"):
        pytest.skip("autocast of another device, or the Triton interpreter (no low-precision arithmetic)")
    paper = make_paper_layer().to(device)
    ours = PushPullConv2d.from_module(paper, backend=backend)
    exact_layer = PushPullConv2d.from_module(paper, backend="reference").double()
    x = torch.randn(4, 16, 24, 24, device=device)
    grad_out = torch.randn(4, 32, 24, 24, device=device)
    exact = _output_and_grads(exact_layer, x.double(), grad_out.double(), torch.autocast(device, enabled=False), False)
    conv_dtype = nn.Conv2d(16, 32, 3).to(device)
    with torch.autocast(device_type, dtype):
        conv_dtype = conv_dtype(x).dtype
    autocast = torch.autocast(device_type, dtype)
    our_results = _output_and_grads(ours, x, grad_out, autocast, backward_inside)
    eager_results = _output_and_grads(paper, x, grad_out, autocast, backward_inside)
    assert our_results[0].dtype == conv_dtype == dtype
    assert our_results[1].dtype == our_results[2].dtype == torch.float32
    for what, value, eager, truth in zip(("output", "input grad", "weight grad"), our_results, eager_results, exact):
        assert _error(value, truth) <= 2 * _error(eager, truth), (
            f"{what}: ours {_error(value, truth):.3g} vs eager {_error(eager, truth):.3g}"
        )


def test_converted_resnet_trains_under_autocast():
    model, replaced = convert(tiny_resnet(), "b1", pull="invert", avg_kernel=3)
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", torch.bfloat16):
        stem_out = model.conv1(x)
        loss = model(x).float().square().mean()
    loss.backward()
    assert stem_out.dtype == torch.bfloat16
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters()
    )


# ---------------------------------------------------------------------------- channels_last


def _is_channels_last(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_layer_channels_last_in_and_out(backend_device):
    backend, device = backend_device
    layer = PushPullConv2d(4, 6, 3, padding=1, pull="invert", avg_kernel=3, backend=backend).to(device, torch.float64)
    x = torch.randn(2, 4, 7, 9, device=device, dtype=torch.float64)
    grad_out = torch.randn(2, 6, 7, 9, device=device, dtype=torch.float64)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.to(memory_format=layout).requires_grad_()
        out = layer(xl)
        results.append((out, *torch.autograd.grad(out, (xl, layer.weight), grad_out)))
    (out, grad_x, grad_w), (out_cl, grad_x_cl, grad_w_cl) = results
    if keeps_channels_last(backend, device, torch.float64):  # as nn.Conv2d
        assert _is_channels_last(out_cl) and _is_channels_last(grad_x_cl)
    for value, expected in zip(results[1], results[0]):
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)


def test_converted_resnet_channels_last():
    model, replaced = convert(tiny_resnet(), "b1", pull="invert", avg_kernel=3)
    model = model.double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    expected_out = model(x)
    expected_out.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model = model.to(memory_format=torch.channels_last)
    layouts = {}

    def record_layouts(module, inputs, out):
        layouts[module] = (_is_channels_last(inputs[0]), _is_channels_last(out))

    for name in replaced:
        model.get_submodule(name).register_forward_hook(record_layouts)
    out = model(x.to(memory_format=torch.channels_last))
    out.sum().backward()
    assert list(layouts.values()) == [(True, True)] * len(replaced)
    torch.testing.assert_close(out, expected_out, rtol=1e-9, atol=1e-9)
    for p, expected in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-9)
