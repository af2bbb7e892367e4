"""Property-based fuzzing: random layer configurations on every fused backend against the reference.

Each example draws a whole configuration (kernel 1-7 incl. rectangular, stride 1-3, padding 0-3,
dilation 1-2, groups, both pull modes and valid scales, avg 0/1/3/5, biases, the three alpha forms
trainable or not, dual output, odd sizes, batch 0-3, contiguous / channels_last / sliced / transposed
input, a non-contiguous weight, tied weights) and checks the output and every gradient in float64
against pushpull_ext.reference to 1e-9 relative (the float64 tolerance).

Hypothesis is derandomized (same examples every run) with no deadline. The profile comes from
PUSHPULL_FUZZ_PROFILE: "ci" (default; a couple of minutes on 2 CPU cores) or "long" (thousands of
examples per backend, for GPU runs). The examples run per backend are counted (hardening_results).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import hardening_results
import torch
from agreement import random_grad_output
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from pushpull_ext import push_pull_conv2d
from pushpull_ext.options import layer_options, upsampled_size

PROFILE_ENV = "PUSHPULL_FUZZ_PROFILE"
# Examples per backend kind in each profile. The Triton interpreter runs NumPy per kernel step:
# it gets tiny shapes and fewer examples.
EXAMPLES = {
    "ci": {"compiled": 300, "interpreter": 20},
    "long": {"compiled": 3000, "interpreter": 200},
}
for _name in EXAMPLES:
    settings.register_profile(
        _name,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed")
ALPHA_FORMS = ("number", "scalar", "vector")


@dataclass(frozen=True)
class Config:
    """One fuzzed call: sizes, options and what requires grad (printed by hypothesis on failure)."""

    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    pull: str
    scale: float
    avg_kernel: int
    dual_output: bool
    bias_in: bool
    bias_out: bool
    alpha_form: str
    alpha_value: float
    alpha_trainable: bool
    input_grad: bool
    weight_grad: bool
    layout: str
    tied_weights: bool
    seed: int


def _input_size(draw, kernel, stride, padding, dilation, max_out):
    """An input size giving 1..max_out outputs, with a random remainder so sizes come out odd too."""
    out = draw(st.integers(1, max_out))
    extra = draw(st.integers(0, stride - 1))
    return max(1, (out - 1) * stride + dilation * (kernel - 1) + 1 - 2 * padding + extra)


def _dilation(draw, kernel, pull, scale):
    """1-2; only 1 where the 2020 pull kernel grows (its padding does not scale with dilation, README "The formula")."""
    grows = pull == "upsample" and scale != 1 and upsampled_size(kernel, scale) != kernel
    return 1 if grows else draw(st.integers(1, 2))


@st.composite
def configs(draw, tiny: bool) -> Config:
    pull = ("upsample", "invert")[draw(st.integers(0, 1))]
    scale = draw(st.sampled_from((1.0, 1.5, 2.0, 2.5, 3.0))) if pull == "upsample" else 2.0
    odd_only = pull == "upsample" and scale != 1  # even kernels are refused there (README "The formula")
    kernel_sizes = st.sampled_from((1, 3, 5, 7)) if odd_only else st.integers(1, 7)
    kernel = (draw(kernel_sizes), draw(kernel_sizes))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    dilation = tuple(_dilation(draw, k, pull, scale) for k in kernel)
    max_out = 3 if tiny else 6
    height, width = (_input_size(draw, *dims, max_out) for dims in zip(kernel, stride, padding, dilation))
    groups = draw(st.integers(1, 3))
    dual_output = draw(st.booleans())
    alpha_form = draw(st.sampled_from(ALPHA_FORMS))
    return Config(
        batch=draw(st.sampled_from((2, 1, 0) if tiny else (2, 3, 1, 0))),  # empty batches, but not too often
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3 if tiny else 6)),  # > 8: masks span several bytes
        height=height,
        width=width,
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        pull=pull,
        scale=scale,
        avg_kernel=draw(st.sampled_from((0, 1, 3, 5))),
        dual_output=dual_output,
        bias_in=draw(st.booleans()),
        bias_out=not dual_output and draw(st.booleans()),
        alpha_form=alpha_form,
        alpha_value=draw(st.sampled_from((0.0, 0.5, 1.0, 1.7, -0.3))),
        alpha_trainable=alpha_form != "number" and draw(st.booleans()),
        input_grad=draw(st.booleans()),
        weight_grad=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        tied_weights=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values in a given memory layout (channels_last, or a non-contiguous view)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def _make_tensors(cfg: Config, device) -> tuple[dict, dict]:
    """(leaf tensors, keyword options) of a config; values from cfg.seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    make = dict(dtype=torch.float64, generator=gen)
    c_in_group = cfg.in_channels // cfg.groups
    x = torch.randn(cfg.batch, cfg.in_channels, cfg.height, cfg.width, **make)
    w = (
        torch.randn(cfg.out_channels, c_in_group, *cfg.kernel, **make)
        / (c_in_group * cfg.kernel[0] * cfg.kernel[1]) ** 0.5
    )
    if cfg.tied_weights:  # quantized weights: many equal taps, ties in the 2024 max/min
        w = torch.round(w * 4) / 4
    # A non-contiguous weight (the reversed layout of a permuted tensor) with the same values.
    w = w.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    tensors = {
        "input": _laid_out(x.to(device), cfg.layout).requires_grad_(cfg.input_grad),
        "weight": w.to(device).requires_grad_(cfg.weight_grad),
    }
    for name, present in (("bias", cfg.bias_in), ("bias_out", cfg.bias_out)):
        if present:
            tensors[name] = (0.3 * torch.randn(cfg.out_channels, **make)).to(device).requires_grad_(True)
    options = layer_options(cfg)
    if cfg.alpha_form == "number":
        options["alpha"] = cfg.alpha_value
    else:
        shape = () if cfg.alpha_form == "scalar" else (cfg.out_channels,)
        alpha = cfg.alpha_value + 0.2 * torch.rand(shape, **make)
        tensors["alpha"] = alpha.to(device).requires_grad_(cfg.alpha_trainable)
    return tensors, options


def _output_and_grads(backend, tensors, options, grad_seed):
    kwargs = {k: v for k, v in tensors.items() if k not in ("input", "weight")}
    out = push_pull_conv2d(tensors["input"], tensors["weight"], **kwargs, **options, backend=backend)
    leaves = {k: v for k, v in tensors.items() if v.requires_grad}
    if not out.requires_grad:  # e.g. the reference's dual output, when only alpha (unused there) trains
        return out, {k: torch.zeros_like(v) for k, v in leaves.items()}
    grads = torch.autograd.grad(out, list(leaves.values()), random_grad_output(out, grad_seed), allow_unused=True)
    return out, {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}


def _assert_close(actual, expected, what):
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


def check_against_reference(backend: str, device: str, cfg: Config) -> None:
    tensors, options = _make_tensors(cfg, device)
    out, grads = _output_and_grads(backend, tensors, options, cfg.seed + 1)
    expected, expected_grads = _output_and_grads("reference", tensors, options, cfg.seed + 1)
    assert out.shape == expected.shape
    _assert_close(out, expected, "output")
    for name, grad in grads.items():
        _assert_close(grad, expected_grads[name], f"gradient of {name}")


def _backend_kind(backend: str, device: str) -> str:
    return "interpreter" if backend == "triton" and device == "cpu" else "compiled"


def fuzz_settings(backend: str, device: str) -> settings:
    profile = os.environ.get(PROFILE_ENV, "ci")
    if profile not in EXAMPLES:
        raise ValueError(f"{PROFILE_ENV} must be one of {sorted(EXAMPLES)}, got {profile!r}")
    return settings(settings.get_profile(profile), max_examples=EXAMPLES[profile][_backend_kind(backend, device)])


def test_fuzzed_configurations_match_reference(fused_backend_device):
    backend, device = fused_backend_device
    tiny = _backend_kind(backend, device) == "interpreter"

    @fuzz_settings(backend, device)
    @given(cfg=configs(tiny=tiny))
    def check(cfg):
        note(f"backend={backend} device={device}")
        check_against_reference(backend, device, cfg)
        hardening_results.count("fuzz_examples", f"{backend}-{device}")

    check()
