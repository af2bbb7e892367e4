"""pushpull_ext: fused push-pull inhibition convolutions for PyTorch.

    y = ReLU(conv(x, k) + b_in) - alpha * ReLU(avg(conv(x, q(k)) - b_in)) + b_out

with the pull kernel q(k) of Strisciuglio et al. 2020 ("upsample") or Bennabhaktula et al. 2024
("invert"). The formula: README.md, section "The formula"; in plain PyTorch: pushpull_ext/reference.py.
"""

import torch

from . import export  # noqa: F401  (pushpull_ext.export.to_onnx)
from ._ext import CPP_ERROR, TRITON_ERROR, has_cpp_kernel
from ._version import __version__
from .conversion import convert
from .functional import _cpp_problem, _triton_problem, push_pull_conv2d, resolve_backend
from .modules import PushPullConv2d
from .options import PushPullArgs
from .pull_cache import clear as clear_pull_cache
from .reference import pull_kernel, push_pull_reference


def available_backends() -> dict:
    """Each backend and None if it can run on this machine (cpu: CPU tensors; cuda and triton: the
    current GPU's tensors, or for triton CPU tensors under TRITON_INTERPRET=1), else why not. The
    reasons are those push_pull_conv2d(..., backend=...) would raise."""
    gpu = torch.cuda.is_available()
    probe = torch.empty(0, device="cuda" if gpu else "cpu")
    if gpu:
        cuda = _cpp_problem(probe, "cuda")
    else:
        built = CPP_ERROR or (None if has_cpp_kernel("cuda") else "pushpull_ext._C was built without CUDA kernels")
        cuda = "no CUDA GPU here" + (f"; and {built}" if built else "")
    triton = _triton_problem(probe)
    if triton is not None and not gpu and TRITON_ERROR is None:
        triton = f"no CUDA GPU here (Triton needs one of compute capability >= 8.0): {triton}"
    return {"cpu": _cpp_problem(torch.empty(0), "cpu"), "cuda": cuda, "triton": triton, "reference": None}


__all__ = [
    "push_pull_conv2d",
    "PushPullConv2d",
    "convert",
    "PushPullArgs",
    "pull_kernel",
    "push_pull_reference",
    "resolve_backend",
    "available_backends",
    "clear_pull_cache",
    "CPP_ERROR",
    "TRITON_ERROR",
    "__version__",
]
