"""The registered ops: opcheck (schema, fake, autograd registration), torch.compile and export."""

import pytest
import torch
from cases import case_params, make_case, skip_the_wide_case_under_the_interpreter
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pushpull_ext import PushPullConv2d
from pushpull_ext._ext import has_cpp_kernel
from pushpull_ext.ops import GEOMETRY, GRADIENTS, BackwardArgs, ForwardArgs
from pushpull_ext.options import normalize, pull_operands, saved_bytes

OPCHECK_CASES = case_params(
    "2020-default",
    "2020-scale1.5-avg3-bout",
    "2020-dual",
    "2024-stem",
    "2024-dilation-rect-nopad",
    "2020-wide-groups-stride-avg3",
)


def _op_args(inputs, opts, save_masks):
    opts = dict(opts)
    alpha = inputs.get("alpha", opts.pop("alpha", 1.0))
    args, alpha_vec = normalize(
        inputs["input"],
        inputs["weight"],
        inputs.get("bias"),
        inputs.get("bias_out"),
        alpha,
        stride=opts.get("stride", 1),
        padding=opts.get("padding", 0),
        dilation=opts.get("dilation", 1),
        groups=opts.get("groups", 1),
        pull=opts["pull"],
        scale=opts.get("scale", 2.0),
        avg_kernel=opts.get("avg_kernel", 0),
        dual_output=opts.get("dual_output", False),
    )
    shift, rows, cols = pull_operands(inputs["weight"], args)
    if shift is not None:  # a leaf of its own, so opcheck may backprop through it repeatedly
        shift = shift.detach().requires_grad_(save_masks)
    kernel = tuple(inputs["weight"].shape[2:])
    return (
        inputs["input"],
        inputs["weight"],
        shift,
        rows,
        cols,
        inputs.get("bias"),
        inputs.get("bias_out"),
        alpha_vec,
        list(args.stride),
        list(args.padding),
        list(args.pull_padding(kernel)),
        list(args.dilation),
        args.groups,
        args.avg_kernel,
        args.dual_output,
        save_masks,
    )


def _ops_for(backend):
    if backend == "triton":
        return torch.ops.pushpull.triton_forward, torch.ops.pushpull.triton_backward
    return torch.ops.pushpull.forward, torch.ops.pushpull.backward


def test_argument_names_match_the_schemas(fused_backend_device):
    """ops.ForwardArgs / BackwardArgs / GRADIENTS / GEOMETRY name the ops' arguments: they must be the schemas'
    names."""
    forward, backward = _ops_for(fused_backend_device[0])
    forward_names = [a.name for a in forward.default._schema.arguments]
    assert forward_names == list(ForwardArgs._fields)
    backward_names = [a.name for a in backward.default._schema.arguments]
    assert backward_names[-len(GEOMETRY) - 1 : -1] == list(GEOMETRY) and backward_names[-1] == "output_mask"
    assert backward_names == list(BackwardArgs._fields)
    assert set(GRADIENTS) <= set(forward_names)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("sizes, options", OPCHECK_CASES)
def test_opcheck_forward_and_backward(fused_backend_device, request, sizes, options, requires_grad):
    backend, device = fused_backend_device
    skip_the_wide_case_under_the_interpreter(backend, device, request, "the schema checks are the smaller cases'")
    forward, backward = _ops_for(backend)
    inputs, opts = make_case(sizes, options, torch.float64, device, requires_grad=requires_grad)
    args = _op_args(inputs, opts, save_masks=requires_grad)
    # The interpreter cannot run on the fake tensors of the aot_dispatch tests: it is opaque there.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend == "triton" and device == "cpu":
        utils = utils[:3]
    torch.library.opcheck(forward, args, test_utils=utils)
    if requires_grad:
        out, masks = forward(*args)
        grad_out = torch.randn_like(out)
        backward_args = (grad_out, *args[:5], args[5], args[7], masks, *args[8:15], [True] * 6)
        torch.library.opcheck(backward, backward_args, test_utils=utils[:3])


# Trainable alpha (a vector or a 0-d tensor) on every CPU route: upsample at stride 1 and strided, invert
# with and without pooling, groups.
SAVE_PULL_CASES = case_params(
    "2020-scale1.5-avg3-bout",
    "2020-groups-stride-rect",
    "2024-stem",
    "2024-avg5-groups-biases",
    "2024-dilation-rect-nopad",
)
needs_cpu_kernel = pytest.mark.skipif(not has_cpp_kernel("cpu"), reason="the C++ CPU kernel is not built")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("sizes, options", SAVE_PULL_CASES)
def test_cpu_saved_pull_gives_the_recomputed_gradients(sizes, options, dtype, tol):
    """save_pull: the CPU forward saves ReLU(Q') after the masks (the fake knows the buffer's length), and
    the backward's alpha gradient read from it is the one it gets by recomputing the pull response."""
    inputs, opts = make_case(sizes, options, dtype, "cpu", requires_grad=True)
    args = ForwardArgs(*_op_args(inputs, opts, save_masks=True))
    with_pull = args._replace(save_pull=True)
    torch.library.opcheck(torch.ops.pushpull.forward, with_pull, test_utils=("test_schema", "test_faketensor"))
    out, masks = torch.ops.pushpull.forward(*args)
    out_saved, saved = torch.ops.pushpull.forward(*with_pull)
    n, c_out, ho, wo = out.shape
    assert saved.numel() == saved_bytes(n, c_out, ho, wo, dtype, True) > masks.numel()
    assert torch.equal(out_saved, out) and torch.equal(saved[: masks.numel()], masks)
    grad_out = torch.randn_like(out)

    def grads(buffer):
        return torch.ops.pushpull.backward(*BackwardArgs.after(args, grad_out, buffer, [True] * 6))

    for name, recomputed, read in zip(GRADIENTS, grads(masks), grads(saved)):
        scale = max(recomputed.abs().max().item(), 1.0) if recomputed.numel() else 1.0
        torch.testing.assert_close(read, recomputed, rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"{n}: {m}")


@needs_cpu_kernel
def test_save_pull_is_refused_where_it_cannot_hold():
    inputs, opts = make_case(*SAVE_PULL_CASES[0].values, torch.float32, "cpu", requires_grad=True)
    args = ForwardArgs(*_op_args(inputs, opts, save_masks=True))
    with pytest.raises(RuntimeError, match="save_pull needs save_masks=True"):
        torch.ops.pushpull.forward(*args._replace(save_masks=False, save_pull=True))
    with pytest.raises(RuntimeError, match="save_pull needs save_masks=True and dual_output=False"):
        torch.ops.pushpull.forward(*args._replace(dual_output=True, bias_out=None, save_pull=True))


def test_triton_forward_refuses_save_pull(fused_backend_device):
    backend, device = fused_backend_device
    if backend != "triton":
        pytest.skip("the CPU op's refusals: test_save_pull_is_refused_where_it_cannot_hold")
    inputs, opts = make_case(*SAVE_PULL_CASES[0].values, torch.float32, device, requires_grad=True)
    args = ForwardArgs(*_op_args(inputs, opts, save_masks=True))
    with pytest.raises(RuntimeError, match="save_pull is a CPU option"):
        torch.ops.pushpull.triton_forward(*args._replace(save_pull=True))


@needs_cpu_kernel
@pytest.mark.parametrize("train_alpha, pull_saved", [(True, True), (False, False)], ids=["trained", "fixed"])
def test_cpu_layer_saves_the_pull_only_for_a_trained_alpha(train_alpha, pull_saved):
    layer = PushPullConv2d(3, 8, 3, padding=1, pull="invert", avg_kernel=3, train_alpha=train_alpha, backend="cpu")
    buffers = []

    def pack(t):
        if t.dtype == torch.uint8:
            buffers.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(2, 3, 8, 8)).sum().backward()
    assert buffers == [saved_bytes(2, 8, 8, 8, torch.float32, pull_saved)]


def test_backward_fills_no_gradient_for_the_saved_buffer(fused_backend_device):
    """The masks buffer (with a trained alpha on CPU: and ReLU(Q'), an output-sized field) is a
    non-differentiable output: autograd must not zero-fill a gradient of it for the backward."""
    backend, device = fused_backend_device
    layer = PushPullConv2d(3, 8, 3, padding=1, pull="invert", avg_kernel=3, train_alpha=True, backend=backend)
    y = layer.to(device)(torch.randn(2, 3, 8, 8, device=device))
    with _OpsCalled() as called:
        y.sum().backward()
    assert not [op for op, dtype in called.ops if dtype == torch.uint8], called.ops


class _OpsCalled(TorchDispatchMode):
    """The ops dispatched in its scope and the dtype of their (first) result."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        self.ops.append((str(func), first.dtype if isinstance(first, torch.Tensor) else None))
        return out


@pytest.mark.parametrize(
    "pushpull",
    [dict(pull="upsample"), dict(pull="invert", avg_kernel=3, bias_out=True, train_alpha=True)],
    ids=["2020", "2024"],
)
def test_eager_calls_go_below_the_dispatchers_python_and_agree_with_it(fused_backend_device, pushpull):
    """Plain eager calls reach the kernels directly (ops.call_forward: the registered autograd's own
    setup_context and backward in an autograd.Function, the ops called below the Autograd key); under a
    TorchDispatchMode, as under traces and compilers, the ops go through the dispatcher, where the mode
    sees both. The two give the same output and gradients, bit for bit."""
    backend, device = fused_backend_device
    layer = PushPullConv2d(3, 8, 3, padding=1, backend=backend, **pushpull).to(device=device, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 8, 8, 8, device=device, dtype=torch.float64)

    def forward_backward():
        y = layer(x)
        return y, type(y.grad_fn).__name__, torch.autograd.grad(y, (x, *layer.parameters()), grad_out)

    eager, eager_node, eager_grads = forward_backward()
    with _OpsCalled() as called:
        dispatched, dispatched_node, dispatched_grads = forward_backward()
    assert eager_node == "EagerForwardBackward"
    assert dispatched_node != eager_node
    forward_op, backward_op = (str(op.default) for op in _ops_for(backend))
    assert {forward_op, backward_op} <= {op for op, _dtype in called.ops}, called.ops
    assert torch.equal(eager, dispatched)
    for got, expected in zip(eager_grads, dispatched_grads):
        assert torch.equal(got, expected)


class _SmallNet(nn.Module):
    def __init__(self, backend, **pushpull):
        super().__init__()
        self.stem = PushPullConv2d(3, 8, 3, padding=1, backend=backend, **pushpull)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize(
    "pushpull",
    [dict(pull="upsample"), dict(pull="invert", avg_kernel=3, bias_out=True, train_alpha=True)],
    ids=["2020", "2024"],
)
def test_compile_fullgraph_matches_eager(fused_backend_device, pushpull):
    backend, device = fused_backend_device
    net = _SmallNet(backend, **pushpull).to(device=device, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    compile_backend = "aot_eager" if device == "cpu" else "inductor"
    compiled = torch.compile(net, fullgraph=True, backend=compile_backend)
    torch._dynamo.reset()
    eager_out = net(x)
    eager_out.sum().backward()
    eager_grad = net.stem.weight.grad.clone()
    net.zero_grad()
    compiled_out = compiled(x)
    compiled_out.sum().backward()
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(net.stem.weight.grad, eager_grad)


def test_export_keeps_one_op_node(fused_backend_device):
    backend, device = fused_backend_device
    layer = PushPullConv2d(3, 8, 3, padding=1, backend=backend).to(device=device, dtype=torch.float64).eval()
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    program = torch.export.export(layer, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("pushpull" in t for t in targets) == 1, targets
    torch.testing.assert_close(program.module()(x), layer(x))
