"""`push_pull_conv2d`: the public functional form, and the choice of backend."""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import ops, pull_cache
from ._ext import CPP_ERROR, TRITON_INTERPRET, has_cpp_kernel
from .options import BACKENDS, PushPullArgs, normalize, pull_operands
from .reference import pull_kernel, push_pull_reference

_warned_fallback = set()


def _triton_problem(input: Tensor):
    """None if the Triton kernels can run on `input`, else what is missing."""
    if ops.TRITON_OP_ERROR is not None:
        return ops.TRITON_OP_ERROR
    if input.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(input.device)
        if major < 8:
            return f"Triton needs a GPU of compute capability >= 8.0; {input.device} has {major}.{minor}"
        return None
    if input.device.type == "cpu" and TRITON_INTERPRET:
        return None
    return f"Triton runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import); got {input.device}"


def _cpp_problem(input: Tensor, device_type: str):
    if CPP_ERROR is not None:
        return CPP_ERROR
    if input.device.type != device_type:
        return f"backend {device_type!r} runs {device_type} tensors; got tensors on {input.device}"
    if not has_cpp_kernel(device_type):
        return f"pushpull_ext._C was built without {device_type.upper()} kernels; rebuild with FORCE_CUDA=1 and a CUDA toolkit"
    return None


def _problem(backend: str, input: Tensor):
    if backend == "triton":
        return _triton_problem(input)
    if backend in ("cpu", "cuda"):
        return _cpp_problem(input, backend)
    return None  # reference runs anywhere


def resolve_backend(backend: str, input: Tensor) -> str:
    """The backend that will run: `backend`, or for "auto" the best one available for `input`.

    PUSHPULL_BACKEND in the environment overrides "auto". A named backend that cannot run the given
    tensors raises a RuntimeError naming what is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("PUSHPULL_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"PUSHPULL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        problem = _problem(backend, input)
        if problem is not None:
            raise RuntimeError(f"backend={backend!r} cannot run here: {problem}")
        return backend
    candidates = ("triton", "cuda") if input.device.type == "cuda" else ("cpu",)
    problems = []
    for candidate in candidates:
        problem = _problem(candidate, input)
        if problem is None:
            return candidate
        problems.append(f"{candidate}: {problem}")
    if input.device.type not in _warned_fallback:
        _warned_fallback.add(input.device.type)
        warnings.warn("pushpull_ext falls back to the eager reference: " + "; ".join(problems), RuntimeWarning)
    return "reference"


def _pull_operands(weight: Tensor, args: PushPullArgs, dtype: torch.dtype) -> tuple:
    """options.pull_operands of `weight` in `dtype`: derived at every call when a gradient may reach
    `weight`, else kept between calls while `weight` is unchanged (see pull_cache)."""
    if pull_cache.cacheable(weight):
        return pull_cache.cached_operands(weight, args, dtype, pull_operands)
    return tuple(None if t is None else t.to(dtype) for t in pull_operands(weight, args))


def _fused(backend: str, input, weight, pull, bias, bias_out, alpha, args: PushPullArgs) -> Tensor:
    """The fused op; `pull` = (pull_shift, pull_rows, pull_cols) of the push kernel (_pull_operands)."""
    pull_shift, pull_rows, pull_cols = pull
    grad_inputs = (input, weight, pull_shift, bias, bias_out, alpha)
    save_masks = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    forward_op = torch.ops.pushpull.triton_forward if backend == "triton" else torch.ops.pushpull.forward
    out, _masks = forward_op(
        input, weight, pull_shift, pull_rows, pull_cols, bias, bias_out, alpha, list(args.stride),
        list(args.padding), list(args.pull_padding(tuple(weight.shape[2:]))), list(args.dilation), args.groups,
        args.avg_kernel, args.dual_output, save_masks,
    )
    return out


def _autocast_dtype(input) -> torch.dtype | None:
    """The autocast dtype if torch.autocast is on for the input's device, else None."""
    if not isinstance(input, Tensor):
        return None  # normalize() names the problem
    device_type = input.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_cast(t, dtype: torch.dtype):
    """What torch.autocast gives a lower-precision op such as conv2d: floating-point tensors but float64
    in the autocast dtype (a differentiable cast: float32 parameters get float32 gradients)."""
    eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
    return t.to(dtype) if eligible else t


def push_pull_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, stride=1, padding=0, dilation=1,
                     groups: int = 1, pull: str = "upsample", scale: float = 2.0, alpha=1.0,
                     bias_out: Tensor | None = None, avg_kernel: int = 0, dual_output: bool = False,
                     backend: str = "auto") -> Tensor:
    """Push-pull convolution (SPEC): ReLU(P) - alpha * ReLU(Q') + bias_out.

    P = conv2d(input, weight, bias), Q = conv2d(input, q(weight), -bias) with the pull kernel q of
    `pull` ("upsample": 2020, bilinear upsampling by `scale`, negated; "invert": 2024), Q' its
    average over `avg_kernel` x `avg_kernel` windows (count_include_pad=False) when avg_kernel > 1.
    `bias` is the 2020 bias inside the ReLUs, `bias_out` the 2024 bias after them. `alpha` is a
    number or a tensor of shape [] or [C_out]. `dual_output=True` returns cat([ReLU(P), ReLU(Q')], 1).
    The output has the input's memory format (channels_last in, channels_last out). Under
    torch.autocast it runs in the autocast dtype, as nn.Conv2d does. When no gradient can reach
    `weight` (inference), the pull operands derived from it are kept until it changes.
    """
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, pull=pull, scale=scale,
                   avg_kernel=avg_kernel, dual_output=dual_output, backend=backend)
    dtype = _autocast_dtype(input)
    if dtype is None:
        return _push_pull(input, weight, bias, bias_out, alpha, push_weight=weight, **options)
    # As nn.Conv2d under autocast: cast, then run with autocast off, so that the float32 arithmetic
    # inside the kernels is not cast down again.
    cast = (_autocast_cast(t, dtype) for t in (input, weight, bias, bias_out, alpha))
    with torch.autocast(input.device.type, enabled=False):
        return _push_pull(*cast, push_weight=weight, **options)


def _push_pull(input, weight, bias, bias_out, alpha, *, push_weight, backend, **options) -> Tensor:
    """push_pull_conv2d on tensors of one dtype. The pull kernel / operands are derived from `push_weight`,
    the weight before any autocast cast: in its precision (as autocast derives the pull kernel of the
    papers' layers), and so that inference keeps them for the parameter itself."""
    args, alpha_vec = normalize(input, weight, bias, bias_out, alpha, **options)
    chosen = resolve_backend(backend, input)
    if chosen == "reference":
        pull_weight = None if push_weight is weight else pull_kernel(push_weight, args.pull, args.scale).to(weight.dtype)
        out = push_pull_reference(input, weight, bias, bias_out, alpha_vec, args, pull_weight)
    else:
        pull = _pull_operands(push_weight, args, weight.dtype)
        out = _fused(chosen, input, weight, pull, bias, bias_out, alpha_vec, args)
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
