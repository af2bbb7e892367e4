"""ONNX: pushpull_ext.export.to_onnx(model, (x,)) of models with push-pull layers gives a graph of standard
ONNX operators that onnxruntime runs with the eager outputs."""

import importlib
import os

import pytest
import torch
from cases import skip_under_the_interpreter_unless
from paper_models import tiny_resnet
from torch import nn

import pushpull_ext
from pushpull_ext import convert, push_pull_conv2d


def _require(name: str):
    """CI installs onnx and onnxruntime (the test extra): there a missing one fails the run."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


onnx = _require("onnx")
ort = _require("onnxruntime")
_require("onnxscript")  # torch.onnx.export(dynamo=True) builds the graph with it

LAYER_OPTIONS = [
    pytest.param(dict(pull="upsample"), id="upsample-scale2"),
    pytest.param(dict(pull="upsample", scale=1), id="upsample-scale1"),
    pytest.param(dict(pull="invert", avg_kernel=3, bias_out=True), id="invert-avg3-bias_out"),
    pytest.param(dict(pull="upsample", train_alpha=True, alpha_relu=True), id="trainable-alpha"),
]


class DualOutputNet(nn.Module):
    """The functional form with dual_output=True inside a module, its two halves mixed by a convolution."""

    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(4) * 0.1)
        self.mix = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        both = push_pull_conv2d(
            x, self.weight, self.bias, padding=1, pull="invert", avg_kernel=3, dual_output=True, backend=self.backend
        )
        return self.mix(both)


def _export_and_run(model: nn.Module, path, device="cpu", batches=(2,), dynamic_batch=False) -> None:
    """Export `model` (on `device`, where its backend runs) to the file `path`, check the graph, and compare
    onnxruntime's outputs (on the CPU) with eager ones on inputs of each batch size (float32, 1e-4 relative)."""
    model.to(device).eval()
    example = torch.randn(batches[0], 3, 12, 12, device=device)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    pushpull_ext.export.to_onnx(model, (example,), dynamic_shapes=dynamic_shapes, f=str(path), verbose=False)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    op_types = {(node.domain, node.op_type) for node in graph.graph.node}
    assert all(domain in ("", "ai.onnx") for domain, _ in op_types), op_types  # standard operators only
    assert ("", "Conv") in op_types
    assert len(graph.graph.output) == 1  # the masks output of the fused op does not reach the graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in batches:
        x = torch.randn(batch, 3, 12, 12)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = model(x.to(device))
        torch.testing.assert_close(torch.from_numpy(got), expected.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", LAYER_OPTIONS)
def test_converted_resnet_runs_in_onnxruntime(fused_backend_device, options, request, tmp_path):
    backend, device = fused_backend_device
    # The graph is the op's decomposition, the same for every backend; the backend only computes the eager
    # outputs, which the agreement tests check. The interpreter runs one of the layers (its eager ResNet
    # takes it up to a minute a layer).
    kept = request.node.callspec.id.endswith("invert-avg3-bias_out")
    skip_under_the_interpreter_unless(backend, device, kept, "the exported graph is the same for every backend")
    model, replaced = convert(tiny_resnet(), "b1", backend=backend, **options)
    assert len(replaced) == 5  # the stem and the four convolutions of the first stage
    _export_and_run(model, tmp_path / "model.onnx", device, batches=(2, 3), dynamic_batch=True)


def test_dual_output_in_a_module_runs_in_onnxruntime(fused_backend_device, tmp_path):
    backend, device = fused_backend_device
    _export_and_run(DualOutputNet(backend), tmp_path / "dual.onnx", device)


def test_padding_mode_reflect_runs_in_onnxruntime(tmp_path):
    layer = pushpull_ext.PushPullConv2d(3, 4, 3, padding=1, padding_mode="reflect", pull="upsample")
    _export_and_run(nn.Sequential(layer, nn.ReLU(), nn.Conv2d(4, 2, 3)), tmp_path / "reflect.onnx")


def test_torch_export_keeps_the_op_and_decomposes_on_request(fused_backend_device):
    backend, device = fused_backend_device
    model, replaced = convert(tiny_resnet(), "b1", backend=backend, pull="invert", avg_kernel=3, bias_out=True)
    model.to(device).eval()
    x = torch.randn(2, 3, 12, 12, device=device)
    program = torch.export.export(model, (x,))

    def pushpull_nodes(p):
        return [n for n in p.graph.nodes if n.op == "call_function" and "pushpull" in str(n.target)]

    assert len(pushpull_nodes(program)) == len(replaced)
    assert len(pushpull_nodes(program.run_decompositions())) == len(replaced)  # torch's defaults keep it
    plain = program.run_decompositions(pushpull_ext.export.decomposition_table())
    assert not pushpull_nodes(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_no_global_decomposition_and_plain_export_refuses():
    """The decomposition stays out of torch's global table (Inductor would take it for a conflict with the
    op's fallback, an error under CI=1), so a plain torch.onnx.export raises rather than exporting."""
    import torch._decomp

    assert not set(pushpull_ext.export.fused_forward_ops()) & set(torch._decomp.decomposition_table)
    layer = pushpull_ext.PushPullConv2d(3, 4, 3, padding=1, backend="cpu").eval()
    with pytest.raises(Exception, match="pushpull"):
        torch.onnx.export(layer, (torch.randn(1, 3, 8, 8),), dynamo=True)
