"""pushpull_ext.convert on ResNets and other module trees, and the papers' checkpoints in whole models."""

import pytest
import torch
from paper_models import Bottleneck, PPmodule2d, PushPullConv2DUnit, resnet20, tiny_resnet
from torch import nn

import pushpull_ext
from pushpull_ext import PushPullConv2d, convert

PLACEMENTS = [
    pytest.param(tiny_resnet, "pp", ["conv1"], id="basic-pp"),
    pytest.param(
        tiny_resnet,
        "b1",
        ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"],
        id="basic-b1",
    ),
    pytest.param(
        lambda: tiny_resnet(Bottleneck, stem="imagenet"),
        "b1",
        ["conv1", "layer1.0.conv2", "layer1.1.conv2"],
        id="bottleneck-b1",
    ),
    pytest.param(
        lambda: resnet20(),
        "b1",
        ["conv1"] + [f"layer1.{b}.conv{c}" for b in range(3) for c in (1, 2)],
        id="resnet20-b1",
    ),
]


def _convs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, PushPullConv2d))}


def _assert_replaced(model, before, replaced):
    after = _convs(model)
    assert set(after) == set(before)
    for name, layer in after.items():
        if name in replaced:
            assert isinstance(layer, PushPullConv2d), name
            torch.testing.assert_close(layer.weight, before[name].weight, rtol=0, atol=0)
            assert (layer.stride, layer.padding, layer.groups) == (
                before[name].stride,
                before[name].padding,
                before[name].groups,
            )
        else:
            assert layer is before[name], name


@pytest.mark.parametrize("make, where, expected", PLACEMENTS)
def test_papers_placements(make, where, expected):
    model = make()
    before = _convs(model)
    model, replaced = convert(model, where, pull="invert", avg_kernel=3)
    assert replaced == expected
    _assert_replaced(model, before, replaced)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(model.get_submodule(name).weight.grad is not None for name in replaced)


@pytest.mark.parametrize(
    "where, expected",
    [
        pytest.param(
            ["layer2.0.downsample.0", "conv1", "layer2.0.conv1"],
            ["conv1", "layer2.0.conv1", "layer2.0.downsample.0"],
            id="names",
        ),
        pytest.param(
            lambda name, conv: conv.kernel_size == (1, 1) or name == "conv1",
            ["conv1", "layer2.0.downsample.0"],
            id="predicate",
        ),
    ],
)
def test_names_and_predicates(where, expected):
    model = tiny_resnet()
    before = _convs(model)
    model, replaced = convert(model, where)
    assert replaced == expected  # in the model's order
    _assert_replaced(model, before, replaced)


def test_keeps_device_dtype_mode_and_frozen_weights(backend_device):
    backend, device = backend_device
    model = tiny_resnet().to(device=device, dtype=torch.float64)
    model.layer1[0].eval()
    model.conv1.weight.requires_grad_(False)
    originals = {name: model.get_submodule(name) for name in ("conv1", "layer1.0.conv1", "layer1.1.conv2")}
    model, replaced = convert(model, "b1", pull="invert", avg_kernel=3, backend=backend)
    for name, conv in originals.items():
        layer = model.get_submodule(name)
        assert (layer.weight.device, layer.weight.dtype, layer.training) == (
            conv.weight.device,
            torch.float64,
            conv.training,
        ), name
        assert layer.weight.requires_grad == conv.weight.requires_grad, name
        x = torch.randn(2, conv.in_channels, 8, 8, device=device, dtype=torch.float64)
        expected = pushpull_ext.push_pull_conv2d(
            x,
            conv.weight,
            conv.bias,
            stride=conv.stride,
            padding=conv.padding,
            pull="invert",
            avg_kernel=3,
            backend="reference",
        )
        torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)


def test_shared_convolution_stays_shared():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), shared, nn.ReLU(), shared)
    model, replaced = convert(model, lambda name, conv: conv is shared)
    assert replaced == ["1", "3"]
    assert model[1] is model[3] and isinstance(model[1], PushPullConv2d)


class _StandardizedConv2d(nn.Conv2d):
    """A Conv2d subclass with a forward of its own, which a push-pull layer would lose."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


def test_conv2d_subclasses_are_left_alone():
    model = nn.Sequential(_StandardizedConv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    assert convert(model, lambda name, conv: True)[1] == ["1"]
    with pytest.raises(ValueError, match="where names '0', a _StandardizedConv2d, not an nn.Conv2d"):
        convert(model, ["0"])


BAD_ARGUMENTS = [
    ("unknown placement", dict(where="b2"), ValueError, r"where must be one of the placements \('pp', 'b1'\)"),
    ("one name as a string", dict(where="conv1"), ValueError, r"for one name use \['conv1'\]"),
    ("not iterable", dict(where=3), TypeError, "where must be a placement"),
    ("not a name", dict(where=[1]), TypeError, "where: module names must be strings, got 1"),
    ("missing name", dict(where=["conv9"]), ValueError, "where names 'conv9', which is not a module of the model"),
    ("not a conv", dict(where=["bn1"]), ValueError, "where names 'bn1', a BatchNorm2d, not an nn.Conv2d"),
    ("unknown option", dict(alhpa=0.5), TypeError, r"unknown push-pull option\(s\) \['alhpa'\]"),
    ("dual output", dict(dual_output=True), ValueError, "cannot use dual_output=True"),
    ("bad option value", dict(pull="push"), ValueError, "pull must be one of"),
]


@pytest.mark.parametrize("kwargs, error, message", [pytest.param(*bad[1:], id=bad[0]) for bad in BAD_ARGUMENTS])
def test_bad_arguments_raise_and_change_nothing(kwargs, error, message):
    model = tiny_resnet()
    before = _convs(model)
    with pytest.raises(error, match=message):
        convert(model, **kwargs)
    assert _convs(model) == before


@pytest.mark.parametrize(
    "model, where, message",
    [
        pytest.param("not a model", "pp", "model must be a torch.nn.Module, got str", id="model"),
        pytest.param(nn.Sequential(nn.Linear(2, 2)), "pp", "where='pp' needs a stem convolution", id="no-conv"),
        pytest.param(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)),
            "b1",
            "where='b1' needs residual blocks",
            id="no-block",
        ),
    ],
)
def test_models_without_what_the_placement_needs(model, where, message):
    with pytest.raises((TypeError, ValueError), match=message):
        convert(model, where)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet18", ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]),
        ("resnet50", ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]),
    ],
)
def test_torchvision_resnets(name, expected):
    models = pytest.importorskip("torchvision.models", reason="torchvision is not installed (no CPU wheel on PyPI)")
    model, replaced = convert(getattr(models, name)(weights=None), "b1")
    assert replaced == expected
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


# ---------------------------------------------------------------------------- the papers' checkpoints

PAPER_STEMS = [  # (the paper's ResNet-20 stem, our options for it)
    pytest.param(lambda: PPmodule2d(3, 16, 3, padding=1, bias=False), dict(), id="2020-pp"),
    pytest.param(
        lambda: PPmodule2d(3, 16, 3, padding=1, bias=False, train_alpha=True, alpha=0.5),
        dict(train_alpha=True, alpha_relu=True),
        id="2020-pp-train-alpha",
    ),
    pytest.param(
        lambda: PushPullConv2DUnit(3, 16, 3, avg_kernel_size=3, padding=1, trainable_pull_inhibition=True),
        dict(pull="invert", avg_kernel=3, bias_out=True, train_alpha=True),
        id="2024-pp3",
    ),
]


def _trained_looking(model):
    """Random parameters and batch-norm statistics, so that every tensor of the checkpoint matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("build", ["convert", "direct"])
@pytest.mark.parametrize("paper_stem, options", PAPER_STEMS)
def test_paper_resnet20_checkpoint_gives_the_same_logits(tmp_path, paper_stem, options, build):
    paper = _trained_looking(resnet20(stem_layer=paper_stem())).double()
    torch.save({"epoch": 160, "state_dict": paper.state_dict()}, tmp_path / "checkpoint.pth.tar")
    if build == "convert":
        ours, _ = convert(resnet20(), "pp", **options)
    else:
        ours = resnet20(stem_layer=PushPullConv2d(3, 16, 3, padding=1, bias=False, **options))
    ours.double().eval().load_state_dict(torch.load(tmp_path / "checkpoint.pth.tar")["state_dict"])  # strict
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), paper(x), rtol=1e-9, atol=1e-9)
