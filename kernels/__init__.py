"""Triton kernels of pushpull_ext (installed as `pushpull_ext.kernels`).

Pure @triton.jit code; the host-side launchers live in pushpull_ext/triton_launch.py.
"""

from .backward import (
    pp_bwd_bias_kernel,
    pp_bwd_input_kernel,
    pp_bwd_weight_adjoint_kernel,
    pp_bwd_weight_kernel,
)
from .forward import pp_fwd_conv_kernel, pp_fwd_pool_epilogue_kernel
from .forward_taps import pp_fwd_tap_kernel

__all__ = [
    "pp_fwd_conv_kernel",
    "pp_fwd_pool_epilogue_kernel",
    "pp_fwd_tap_kernel",
    "pp_bwd_bias_kernel",
    "pp_bwd_input_kernel",
    "pp_bwd_weight_kernel",
    "pp_bwd_weight_adjoint_kernel",
]
