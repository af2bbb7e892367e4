"""The registered ops: opcheck (schema, fake, autograd registration), torch.compile and export."""

import pytest
import torch
from cases import case_params, make_case, skip_the_wide_case_under_the_interpreter
from torch import nn

from pushpull_ext import PushPullConv2d
from pushpull_ext.ops import GEOMETRY, GRADIENTS, BackwardArgs, ForwardArgs
from pushpull_ext.options import normalize, pull_operands

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
