"""PushPullConv2d as a drop-in for nn.Conv2d, and the papers' modules and checkpoints."""

import os

import pytest
import torch
from paper_models import PPmodule2d, PushPullConv2DUnit
from torch import nn

import pushpull_ext
from pushpull_ext import PushPullConv2d

PAPER_MODULES = [
    pytest.param(lambda: PPmodule2d(3, 8, 3, padding=1, alpha=0.5), id="2020"),
    pytest.param(lambda: PPmodule2d(3, 8, 3, padding=1, train_alpha=True, alpha=-0.2), id="2020-train-alpha-negative"),
    pytest.param(lambda: PPmodule2d(3, 8, 5, stride=2, padding=2, scale=1), id="2020-scale1"),
    pytest.param(lambda: PPmodule2d(3, 8, 3, padding=1, dual_output=True), id="2020-dual"),
    pytest.param(lambda: PushPullConv2DUnit(3, 8, 3, padding=1), id="2024"),
    pytest.param(
        lambda: PushPullConv2DUnit(3, 8, 7, 5, stride=2, padding=3, trainable_pull_inhibition=True), id="2024-pp5"
    ),
    pytest.param(lambda: PushPullConv2DUnit(3, 8, 3, 0, bias=False, pull_inhibition_strength=2.0), id="2024-no-avg"),
]


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("make", PAPER_MODULES)
def test_from_module_matches_and_shares_nothing(backend_device, make):
    backend, device = backend_device
    paper = _perturb(make()).to(device=device, dtype=torch.float64)
    ours = PushPullConv2d.from_module(paper, backend=backend)
    x = torch.randn(2, 3, 10, 10, device=device, dtype=torch.float64)
    torch.testing.assert_close(ours(x), paper(x), rtol=1e-9, atol=1e-9)
    paper_storages = {p.untyped_storage().data_ptr() for p in paper.parameters()}
    assert not paper_storages & {p.untyped_storage().data_ptr() for p in ours.parameters()}


@pytest.mark.parametrize("make", PAPER_MODULES)
def test_load_state_dict_of_paper_layouts(make):
    paper = _perturb(make()).double()
    ours = PushPullConv2d.from_module(paper).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.zero_()
    ours.load_state_dict(paper.state_dict())  # strict: every key is recognised
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(ours(x), paper(x), rtol=1e-9, atol=1e-9)


def test_paper_checkpoint_inside_a_model():
    """A model whose first layer is a 2020 layer: its state dict loads into the same model with ours."""
    paper_model = nn.Sequential(
        PPmodule2d(3, 8, 3, padding=1, train_alpha=True), nn.ReLU(), nn.Conv2d(8, 4, 3)
    ).double()
    our_model = nn.Sequential(
        PushPullConv2d(3, 8, 3, padding=1, train_alpha=True, alpha_relu=True), nn.ReLU(), nn.Conv2d(8, 4, 3)
    ).double()
    our_model.load_state_dict(paper_model.state_dict())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(our_model(x), paper_model(x), rtol=1e-9, atol=1e-9)


def test_own_state_dict_round_trip():
    a = PushPullConv2d(4, 6, 3, bias_out=True, train_alpha=True, pull="invert", avg_kernel=3)
    b = PushPullConv2d(4, 6, 3, bias_out=True, train_alpha=True, pull="invert", avg_kernel=3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"weight", "bias", "bias_out", "alpha"}


def test_conv2d_defaults_and_init():
    conv, ours = nn.Conv2d(6, 12, 3), PushPullConv2d(6, 12, 3)
    for name in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(ours, name) == getattr(conv, name), name
    assert ours.weight.shape == conv.weight.shape and ours.bias.shape == conv.bias.shape
    bound = 1 / (6 * 9) ** 0.5
    assert ours.weight.abs().max() <= bound and ours.bias.abs().max() <= bound
    assert PushPullConv2d(6, 12, 3, bias=False).bias is None
    assert "pull='upsample', scale=2.0" in repr(ours) and "6, 12, kernel_size=(3, 3)" in repr(ours)
    same = PushPullConv2d(6, 12, 3, padding="same")
    assert same(torch.randn(1, 6, 9, 9)).shape == (1, 12, 9, 9)


def test_from_conv2d_copies(backend_device):
    backend, device = backend_device
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).to(device=device, dtype=torch.float64)
    layer = PushPullConv2d.from_conv2d(conv, pull="invert", avg_kernel=3, backend=backend)
    assert (layer.stride, layer.padding, layer.groups) == ((2, 2), (1, 1), 2)
    torch.testing.assert_close(layer.weight, conv.weight)
    with torch.no_grad():
        conv.weight.add_(1)
    assert not torch.equal(layer.weight, conv.weight)
    x = torch.randn(2, 4, 9, 9, device=device, dtype=torch.float64)
    expected = pushpull_ext.push_pull_conv2d(
        x, layer.weight, layer.bias, stride=2, padding=1, groups=2, pull="invert", avg_kernel=3, backend="reference"
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("PUSHPULL_BACKEND", "reference")
    assert pushpull_ext.resolve_backend("auto", torch.randn(1)) == "reference"
    monkeypatch.setenv("PUSHPULL_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PUSHPULL_BACKEND must be one of"):
        pushpull_ext.resolve_backend("auto", torch.randn(1))


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI promises Triton (installed by .ci/run)")
def test_triton_backend_is_available_in_ci():
    """CI installs Triton: its kernels must run (interpreter on CPU), not be silently skipped."""
    assert pushpull_ext.available_backends()["triton"] is None, pushpull_ext.available_backends()["triton"]


def test_extension_is_built():
    """CI builds the extension: a missing build must fail here, not silently skip the CPU backend."""
    assert pushpull_ext.CPP_ERROR is None, pushpull_ext.CPP_ERROR
