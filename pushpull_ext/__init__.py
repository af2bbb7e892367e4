"""pushpull_ext: fused push-pull inhibition convolutions for PyTorch.

    y = ReLU(conv(x, k) + b_in) - alpha * ReLU(avg(conv(x, q(k)) - b_in)) + b_out

with the pull kernel q(k) of Strisciuglio et al. 2020 ("upsample") or Bennabhaktula et al. 2024
("invert"). See ../shared/SPEC.md and README.md.
"""
from ._ext import CPP_ERROR, TRITON_ERROR
from .conversion import convert
from .functional import push_pull_conv2d, resolve_backend
from .modules import PushPullConv2d
from .options import PushPullArgs
from .pull_cache import clear as clear_pull_cache
from .reference import pull_kernel, push_pull_reference


def available_backends() -> dict:
    """Each backend and None if it can be built/loaded here, else why not."""
    from ._ext import has_cpp_kernel
    from .ops import TRITON_OP_ERROR

    def cpp(device):
        return CPP_ERROR or (None if has_cpp_kernel(device) else f"pushpull_ext._C has no {device} kernels in this build")

    return {"cpu": cpp("cpu"), "cuda": cpp("cuda"), "triton": TRITON_OP_ERROR, "reference": None}


__all__ = ["push_pull_conv2d", "PushPullConv2d", "convert", "PushPullArgs", "pull_kernel", "push_pull_reference",
           "resolve_backend", "available_backends", "clear_pull_cache", "CPP_ERROR", "TRITON_ERROR"]
__version__ = "0.1.0"
