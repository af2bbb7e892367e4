"""Tensors of more than 2^31 elements (GPUs only): no 32-bit index overflow anywhere.

Two shapes: many images (offsets past 2^31 come from the batch), and one huge image (a single
channel plane has more than 2^31 pixels, so per-plane offsets overflow int32 too). The output
gradient is nonzero only on a few regions (the first and last images, or the top and bottom rows),
so the reference, run in float64 on those regions alone, gives the exact output there, the exact
input gradient there and, summed over the regions, the exact weight gradient.
"""

from dataclasses import dataclass

import pytest
import torch

from pushpull_ext import push_pull_conv2d

HALO = 16  # rows lost at a crop's cut edge: >= pull padding + pooling radius of the cases below


@dataclass(frozen=True)
class HugeCase:
    shape: tuple  # input [N, C, H, W]; C_out = C, 3x3 kernel, padding 1, stride 1: output shape = input shape
    options: dict
    split_dim: int  # 0: regions are images; 2: regions are bands of rows
    buffers: int  # tensors of the output's size alive at once (x, y, grad_y, grad_x, scratch), for the memory check


CASES = {
    "many-images-2020": HugeCase((8200, 4, 256, 256), dict(pull="upsample", padding=1, bias_in=True), 0, 6),
    "one-huge-image-2024": HugeCase((1, 1, 46341, 46341), dict(pull="invert", padding=1, avg_kernel=3), 2, 9),
}


def _regions(size: int, split_dim: int):
    """(crop, valid): two index ranges along split_dim at both ends; valid = where the crop is exact."""
    width = 2 if split_dim == 0 else 64
    halo = 0 if split_dim == 0 else HALO
    return [(range(0, width), range(0, width - halo)), (range(size - width, size), range(size - width + halo, size))]


def _take(t: torch.Tensor, dim: int, rows: range) -> torch.Tensor:
    return t.narrow(dim, rows.start, len(rows))


def _skip_without_memory(case: HugeCase):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    free, _ = torch.cuda.mem_get_info()
    need = case.buffers * 4 * torch.Size(case.shape).numel()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


def _close(actual, expected, what):
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual.double(), expected, rtol=1e-4, atol=1e-4 * max(scale, 1e-30), msg=lambda m: f"{what}: {m}"
    )


def _reference_on(x, w, bias, grad_out, options):
    """float64 reference output and input / weight gradients of one crop."""
    x, w = x.double().requires_grad_(True), w.double().requires_grad_(True)
    bias = None if bias is None else bias.double()
    out = push_pull_conv2d(x, w, bias, backend="reference", **options)
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad_out.double())
    return out.detach(), grad_x, grad_w


@pytest.mark.parametrize("name", list(CASES))
def test_more_than_2_31_elements(fused_backend_device, name):  # float32, TF32 off (conftest.py)
    backend, device = fused_backend_device
    case = CASES[name]
    if device != "cuda":
        pytest.skip("a GPU test (tensors of more than 2^31 elements)")
    _skip_without_memory(case)
    assert torch.Size(case.shape).numel() > 2**31
    options = dict(case.options)
    c = case.shape[1]
    x = torch.randn(case.shape, device=device)
    w = (torch.randn(c, c, 3, 3, device=device) / 3).requires_grad_(True)
    bias = 0.1 * torch.randn(c, device=device) if options.pop("bias_in", False) else None
    x.requires_grad_(True)
    out = push_pull_conv2d(x, w, bias, backend=backend, **options)
    regions = _regions(case.shape[case.split_dim], case.split_dim)
    grad_out = torch.zeros_like(out)
    for _, valid in regions:
        _take(grad_out, case.split_dim, valid).normal_()
    grad_x, grad_w = torch.autograd.grad(out, (x, w), grad_out)
    expected_grad_w = torch.zeros_like(grad_w, dtype=torch.float64)
    for crop, valid in regions:
        ref_out, ref_grad_x, ref_grad_w = _reference_on(
            _take(x.detach(), case.split_dim, crop), w.detach(), bias, _take(grad_out, case.split_dim, crop), options
        )
        local = range(valid.start - crop.start, valid.stop - crop.start)
        _close(
            _take(_take(out, case.split_dim, crop), case.split_dim, local),
            _take(ref_out, case.split_dim, local),
            f"output on {case.split_dim=} {valid}",
        )
        _close(_take(grad_x, case.split_dim, crop), ref_grad_x, f"input gradient on {case.split_dim=} {crop}")
        expected_grad_w += ref_grad_w
    _close(grad_w, expected_grad_w, "weight gradient")
