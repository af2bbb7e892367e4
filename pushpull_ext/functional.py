"""`push_pull_conv2d`: the public functional form, and the choice of backend."""

from __future__ import annotations

import inspect
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from . import ops, pull_cache
from ._ext import CPP_ERROR, TRITON_INTERPRET, has_cpp_kernel
from .options import (
    BACKENDS,
    LAYER_OPTIONS,
    PADDING_MODES,
    PushPullArgs,
    kernel_size_ints,
    normalize,
    pull_operands,
    traced_quietly,
)
from .reference import op_formula, pull_kernel, push_pull_reference

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


# backend="auto" on a CUDA GPU: the backend tried first per pull mode, the other one being the fallback
# (Triton needs compute capability >= 8.0 and Triton installed; the CUDA extension runs on sm_70+).
# Set by the one GPU timing so far (benchmarks/results/h200: an H200, float32, the papers' shapes and
# batches): the CUDA extension was faster than the Triton backend on every shape of both pull modes, forward
# (upsample 0.35 against 0.54 ms on cifar-b1-2020, 9.3 against 16.8 on imagenet-b1-2020; invert 9.7 against
# 14.7 on imagenet-stem-2024, 0.32 against 0.46 on cifar-stem-2024) and forward + backward (1.8 against 4.3,
# 46 against 74; 31 against 45, 2.0 against 2.6 ms).
AUTO_GPU_BACKEND = {"upsample": "cuda", "invert": "cuda"}


def auto_candidates(device_type: str, pull: str | None = None) -> tuple[str, ...]:
    """The backends backend="auto" tries, in order, for tensors on `device_type` and a layer of pull
    mode `pull` (None: not known, as for resolve_backend(backend, input) called alone: the CUDA extension
    first, as for both pull modes)."""
    if device_type != "cuda":
        return ("cpu",)
    first = AUTO_GPU_BACKEND.get(pull, "cuda")
    return (first, "cuda" if first == "triton" else "triton")


def resolve_backend(backend: str, input: Tensor, pull: str | None = None) -> str:
    """The backend that will run: `backend`, or for "auto" the best one available for `input` and a layer of
    pull mode `pull` ("upsample" / "invert"; see AUTO_GPU_BACKEND).

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
    problems = []
    for candidate in auto_candidates(input.device.type, pull):
        problem = _problem(candidate, input)
        if problem is None:
            return candidate
        problems.append(f"{candidate}: {problem}")
    if input.device.type not in _warned_fallback:
        _warned_fallback.add(input.device.type)
        warnings.warn(
            "pushpull_ext falls back to the eager reference: " + "; ".join(problems), RuntimeWarning, stacklevel=2
        )
    return "reference"


def _pull_operands(weight: Tensor, args: PushPullArgs, dtype: torch.dtype) -> tuple:
    """options.pull_operands of `weight` in `dtype`: derived at every call when a gradient may reach
    `weight`, else kept between calls while `weight` is unchanged (see pull_cache)."""
    if pull_cache.cacheable(weight):
        return pull_cache.cached_operands(weight, args, dtype, pull_operands)
    return tuple(None if t is None else t.to(dtype) for t in pull_operands(weight, args))


class OpInputs(NamedTuple):
    """The tensor and geometry arguments of the fused forward ops (schema in csrc/pushpull.cpp)."""

    input: Tensor
    weight: Tensor
    pull: tuple  # (pull_shift, pull_rows, pull_cols) of options.pull_operands
    padding: tuple[int, int]
    pull_padding: tuple[int, int]


def _op_inputs(input: Tensor, weight: Tensor, pull: tuple, args: PushPullArgs) -> OpInputs:
    """What the fused ops get. They pad with zeros, symmetrically; for any other padding (a padding_mode
    other than zeros, padding="same" with an even kernel) the input is padded here, as much as the pull
    convolution needs, and the ops run with no padding. Where the pull window is larger than the push
    kernel (upsample), the push kernel is embedded, zero padded, in the pull window (and the
    interpolation matrices likewise), so that both convolutions read the same padded input."""
    kernel_size = traced_quietly(kernel_size_ints, weight)
    if not args.explicit_padding:
        return OpInputs(input, weight, pull, args.padding, args.pull_padding(kernel_size))
    padded = F.pad(input, args.pad_amounts(kernel_size, pull=True), mode=PADDING_MODES[args.padding_mode])
    grow_h, grow_w = ((q - k) // 2 for q, k in zip(args.pull_size(kernel_size), kernel_size))
    if grow_h or grow_w:
        pull_shift, rows, cols = pull
        weight = F.pad(weight, (grow_w, grow_w, grow_h, grow_h))
        pull = (pull_shift, F.pad(rows, (grow_h, grow_h)), F.pad(cols, (grow_w, grow_w)))
    return OpInputs(padded, weight, pull, (0, 0), (0, 0))


def _under_transform(*tensors) -> bool:
    """Whether forward-mode AD or a torch.func transform (vmap, grad, jvp, ...) sees these tensors: the
    fused ops have no rule for those, so the layer then evaluates its formula in plain ops."""
    if torch.compiler.is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present):
        return True
    if forward_ad._current_level < 0:  # no dual level entered: no tangents anywhere
        return False
    return any(forward_ad.unpack_dual(t).tangent is not None for t in present)


def _fused(backend: str, op: OpInputs, bias, bias_out, alpha, args: PushPullArgs, layout_of: Tensor) -> Tensor:
    """The fused op (or, under a transform, its formula in plain ops); the output in `layout_of`'s memory
    format, as nn.Conv2d gives (channels_last in, channels_last out)."""
    op_args = _forward_args(op, bias, bias_out, alpha, args, save_masks=False)
    grad_inputs = [getattr(op_args, name) for name in ops.GRADIENTS]
    if _under_transform(*grad_inputs):
        return op_formula(*op_args.formula_args())
    # A trace (torch.jit.trace) keeps whatever this call decides: save the masks, so that a module
    # traced under no_grad can still be trained.
    save_masks = torch.jit.is_tracing() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs)
    )
    forward_op = torch.ops.pushpull.triton_forward if backend == "triton" else torch.ops.pushpull.forward
    # The CPU op saves ReLU(Q') for a trainable alpha (one output-sized field, as nn.ReLU saves its
    # output), so that its backward does not compute the pull response again.
    save_pull = save_masks and backend == "cpu" and alpha.requires_grad and not args.dual_output
    out, _masks = ops.call_forward(forward_op, op_args._replace(save_masks=save_masks, save_pull=save_pull))
    if ops.is_channels_last(layout_of):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _forward_args(op: OpInputs, bias, bias_out, alpha, args: PushPullArgs, save_masks: bool) -> ops.ForwardArgs:
    pull_shift, pull_rows, pull_cols = op.pull
    return ops.ForwardArgs(
        op.input,
        op.weight,
        pull_shift,
        pull_rows,
        pull_cols,
        bias,
        bias_out,
        alpha,
        list(args.stride),
        list(op.padding),
        list(op.pull_padding),
        list(args.dilation),
        args.groups,
        args.avg_kernel,
        args.dual_output,
        save_masks,
    )


def forward_args(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, *, save_masks: bool, **options
) -> ops.ForwardArgs:
    """The arguments push_pull_conv2d gives the fused forward op for these (a 4-D input, tensors of one
    dtype, push_pull_conv2d's keyword arguments but `backend`): for driving the launchers directly
    (compile_check)."""
    options = {**_KEYWORD_DEFAULTS, **options}
    bias_out, alpha = options.pop("bias_out"), options.pop("alpha")
    args, alpha_vec = normalize(input, weight, bias, bias_out, alpha, **options)
    op = _op_inputs(input, weight, _pull_operands(weight, args, weight.dtype), args)
    return _forward_args(op, bias, bias_out, alpha_vec, args, save_masks)


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


def push_pull_conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    pull: str = "upsample",
    scale: float = 2.0,
    alpha=1.0,
    bias_out: Tensor | None = None,
    avg_kernel: int = 0,
    dual_output: bool = False,
    padding_mode: str = "zeros",
    backend: str = "auto",
) -> Tensor:
    """Push-pull convolution: ReLU(P) - alpha * ReLU(Q') + bias_out (the formula in README.md).

    P = conv2d(input, weight, bias), Q = conv2d(input, q(weight), -bias) with the pull kernel q of
    `pull` ("upsample": 2020, bilinear upsampling by `scale`, negated; "invert": 2024), Q' its
    average over `avg_kernel` x `avg_kernel` windows (count_include_pad=False) when avg_kernel > 1.
    `bias` is the 2020 bias inside the ReLUs, `bias_out` the 2024 bias after them. `alpha` is a
    number or a tensor of shape [] or [C_out]. `dual_output=True` returns cat([ReLU(P), ReLU(Q')], 1).
    The output has the input's memory format (channels_last in, channels_last out). Under
    torch.autocast it runs in the autocast dtype, as nn.Conv2d does. When no gradient can reach
    `weight` (inference), the pull operands derived from it are kept until it changes.

    As nn.Conv2d: `padding` is an int, a pair, "valid" or "same"; `padding_mode` ("zeros", "reflect",
    "replicate", "circular") is how each of the two convolutions pads the input (the push one by
    `padding`, the pull one by its own, larger for upsample); an unbatched input [C_in, H, W] gives an
    unbatched output.
    """
    values = (stride, padding, dilation, groups, pull, scale, avg_kernel, dual_output, padding_mode, backend)
    options = dict(zip((*LAYER_OPTIONS, "padding_mode", "backend"), values))  # by name, as the signature has them
    if isinstance(input, Tensor) and input.dim() == 3:  # unbatched, as nn.Conv2d
        return push_pull_conv2d(input.unsqueeze(0), weight, bias, alpha=alpha, bias_out=bias_out, **options).squeeze(0)
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
    chosen = resolve_backend(backend, input, args.pull)
    if chosen == "reference":
        pull_weight = (
            None if push_weight is weight else pull_kernel(push_weight, args.pull, args.scale).to(weight.dtype)
        )
        return push_pull_reference(input, weight, bias, bias_out, alpha_vec, args, pull_weight)
    pull = _pull_operands(push_weight, args, weight.dtype)
    return _fused(chosen, _op_inputs(input, weight, pull, args), bias, bias_out, alpha_vec, args, layout_of=input)


# push_pull_conv2d's keyword arguments and their defaults, but the backend (forward_args).
_KEYWORD_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(push_pull_conv2d).parameters.items()
    if p.kind is p.KEYWORD_ONLY and name != "backend"
}
