"""Which memory format push_pull_conv2d gives a channels_last input, by backend and device: what the
channels_last checks expect."""

import functools

import torch
import torch.nn.functional as F

from pushpull_ext.ops import is_channels_last


@functools.lru_cache
def conv2d_keeps_channels_last(device, dtype) -> bool:
    """Whether eager PyTorch's conv2d gives a channels_last input a channels_last output and input gradient
    on `device` in `dtype`. On the CPU it does; on a GPU cuDNN has no channels_last kernels for float64, and
    PyTorch computes (and returns) float64 convolutions there in the contiguous format."""
    x = torch.ones(1, 2, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        out = F.conv2d(x.requires_grad_(True), torch.ones(2, 2, 3, 3, device=device, dtype=dtype), padding=1)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    return is_channels_last(out) and is_channels_last(grad)


def keeps_channels_last(backend, device, dtype) -> bool:
    """Whether `backend` gives a channels_last input a channels_last output and input gradient: the fused
    backends always (as nn.Conv2d on the CPU: functional.py, ops.py); the reference, eager PyTorch, where its
    conv2d does (conv2d_keeps_channels_last)."""
    return backend != "reference" or conv2d_keeps_channels_last(str(device), dtype)
