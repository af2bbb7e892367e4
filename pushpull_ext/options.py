"""Argument checking and the pull-kernel geometry, written once for every backend.

`normalize` turns the public arguments of `push_pull_conv2d` into a `PushPullArgs`, raising a clear
error (naming the argument) for anything the layer does not allow. The backends (C++ op, Triton op,
reference) all receive the same normalized arguments, so no backend repeats these checks in Python.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

PULL_MODES = ("upsample", "invert")
BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
# The geometry keywords of push_pull_conv2d, each also an attribute of PushPullConv2d (layer_options).
LAYER_OPTIONS = ("stride", "padding", "dilation", "groups", "pull", "scale", "avg_kernel", "dual_output")
# nn.Conv2d's padding modes and the F.pad mode each one pads with.
PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def layer_options(source) -> dict:
    """The LAYER_OPTIONS keywords of push_pull_conv2d, read from the attributes of `source` (a
    PushPullConv2d, or a test's configuration)."""
    return {name: getattr(source, name) for name in LAYER_OPTIONS}


def upsampled_size(size: int, scale: float) -> int:
    """Pull kernel size of the 2020 layer: floor(size * scale), made odd by adding one."""
    grown = int(math.floor(size * scale))
    return grown + 1 if grown % 2 == 0 else grown


def mask_planes_shape(n, c_out, ho, wo) -> tuple:
    """The layout of the fused ops' packed ReLU masks, which they hold flat: [2 (push, pull), N,
    ceil(C_out/8) bytes, Ho, Wo], bit o % 8 of byte o // 8 for channel o."""
    return (2, n, (c_out + 7) // 8, ho, wo)


def mask_bytes(n, c_out, ho, wo):
    """The length of the fused ops' flat masks buffer (mask_planes_shape's elements)."""
    return math.prod(mask_planes_shape(n, c_out, ho, wo))


def saved_pull_offset(n, c_out, ho, wo) -> int:
    """Where ReLU(Q') starts in the forward's saved buffer with save_pull (the CPU op): after the masks,
    at the next multiple of 64 bytes."""
    return -(-mask_bytes(n, c_out, ho, wo) // 64) * 64


def saved_bytes(n, c_out, ho, wo, dtype: torch.dtype, save_pull: bool) -> int:
    """The length of the forward's saved buffer: the masks, then with save_pull ReLU(Q') [N, C_out, Ho, Wo]
    in the accumulation type (float64 for float64 inputs, else float32)."""
    if not save_pull:
        return mask_bytes(n, c_out, ho, wo)
    itemsize = 8 if dtype == torch.float64 else 4
    return saved_pull_offset(n, c_out, ho, wo) + n * c_out * ho * wo * itemsize


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def interpolation_matrix(size: int, new_size: int, dtype, device) -> torch.Tensor:
    """Matrix U [new_size, size] with U @ v == 1-D bilinear resize (align_corners=True) of v.

    Built by resizing the identity with PyTorch's own bilinear interpolation, so the pull kernel
    -U k V^T is exactly what `F.interpolate` gives the reference. In eager mode each matrix is built once
    and kept (a layer asks for two at every call: building them cost about 100 us, a tenth of a small
    layer's forward); traced code (torch.compile, export, torch.jit.trace) and code under a tensor mode (fake
    tensors) build them at every call.
    """
    if not _eager_reuse_allowed():
        return _interpolation_matrix(size, new_size, dtype, device)
    key = (size, new_size, dtype, torch.device(device))
    matrix = _interpolation_matrices.get(key)
    if matrix is None:
        # A plain tensor outside inference mode (autograd may save it for the backward), whatever mode the
        # first caller was in.
        with torch.inference_mode(False):
            matrix = _interpolation_matrices[key] = _interpolation_matrix(size, new_size, dtype, device)
    return matrix


def _eager_reuse_allowed() -> bool:
    """Whether values kept from an earlier call may serve this one: not in traced code (torch.compile,
    export, torch.jit.trace, which must record the computation) nor under a tensor mode (fake tensors)."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or is_in_torch_dispatch_mode())


def _interpolation_matrix(size: int, new_size: int, dtype, device) -> torch.Tensor:
    eye = torch.eye(size, dtype=torch.float64).view(1, size, size, 1)
    cols = F.interpolate(eye, size=(new_size, 1), mode="bilinear", align_corners=True)
    return cols.view(size, new_size).t().contiguous().to(dtype=dtype, device=device)


_interpolation_matrices: dict = {}  # (size, new_size, dtype, device) -> matrix (interpolation_matrix)


@dataclass(frozen=True)
class PushPullArgs:
    """Normalized arguments shared by every backend (the formula: README.md, "The formula")."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pull: str
    scale: float
    avg_kernel: int
    dual_output: bool
    padding_mode: str = "zeros"
    # Extra zeros after the input (bottom, right): padding="same" with an even d * (kernel - 1) pads
    # asymmetrically, as nn.Conv2d does; `padding` is then the smaller, leading part.
    padding_extra: tuple[int, int] = (0, 0)

    @property
    def explicit_padding(self) -> bool:
        """Whether the input must be padded before the convolutions (a padding mode other than zeros,
        or asymmetric padding), which then run with no padding of their own."""
        return self.padding_mode != "zeros" or self.padding_extra != (0, 0)

    def pad_amounts(self, kernel_size: tuple[int, int], pull: bool = False) -> tuple[int, int, int, int]:
        """F.pad's (left, right, top, bottom) of the push (or pull) convolution."""
        (top, left) = self.pull_padding(kernel_size) if pull else self.padding
        return (left, left + self.padding_extra[1], top, top + self.padding_extra[0])

    @property
    def pull_is_negated_push(self) -> bool:
        """2020 with scale 1: q = -k, so the pull response is -P and needs no convolution."""
        return self.pull == "upsample" and self.scale == 1

    def pull_size(self, kernel_size: tuple[int, int]) -> tuple[int, int]:
        if self.pull == "upsample" and self.scale != 1:
            return tuple(upsampled_size(k, self.scale) for k in kernel_size)
        return tuple(kernel_size)

    def pull_padding(self, kernel_size: tuple[int, int]) -> tuple[int, int]:
        # The 2020 code grows the padding by the kernel growth, not scaled by dilation (reproduced).
        pull_size = self.pull_size(kernel_size)
        return tuple(q // 2 - k // 2 + p for q, k, p in zip(pull_size, kernel_size, self.padding))

    def output_size(self, input_hw, kernel_size) -> tuple[int, int]:
        grown = (h + e for h, e in zip(input_hw, self.padding_extra))
        return tuple(
            conv_output_size(*dims) for dims in zip(grown, kernel_size, self.stride, self.padding, self.dilation)
        )

    def pull_output_size(self, input_hw, kernel_size) -> tuple[int, int]:
        grown = (h + e for h, e in zip(input_hw, self.padding_extra))
        return tuple(
            conv_output_size(*dims)
            for dims in zip(
                grown, self.pull_size(kernel_size), self.stride, self.pull_padding(kernel_size), self.dilation
            )
        )


def normalize(input, weight, bias, bias_out, alpha, **options) -> tuple[PushPullArgs, torch.Tensor]:
    """Check every argument; return the normalized options and alpha as a [C_out] tensor.

    The checks depend only on the tensors' types, shapes, dtypes and devices, on alpha (its value, when a
    number) and on the options: in eager mode a call like an earlier one reuses that call's result (checking
    cost a small layer's call about 30-50 us, a fifth of its time on one image). Traced code (torch.compile,
    export, torch.jit.trace) and code under a tensor mode check every call."""
    key = _memo_key(input, weight, bias, bias_out, alpha, options)
    memo = _normalized.get(key) if key is not None else None
    if memo is not None:
        args, constant_alpha = memo
        return args, constant_alpha if constant_alpha is not None else _alpha_vector(alpha, weight)
    if key is None:
        return _normalize(input, weight, bias, bias_out, alpha, **options)
    # A number's alpha vector is a constant, kept as interpolation_matrix keeps its matrices: a plain tensor
    # made outside inference mode, whatever mode the first caller was in. A tensor alpha's vector follows the
    # tensor: made again at every call.
    constant = not isinstance(alpha, torch.Tensor)
    with torch.inference_mode(False) if constant else contextlib.nullcontext():
        args, alpha_vec = _normalize(input, weight, bias, bias_out, alpha, **options)
    if len(_normalized) >= _MEMO_SIZE:
        _normalized.clear()
    _normalized[key] = (args, alpha_vec if constant else None)
    return args, alpha_vec


_MEMO_SIZE = 1024
_normalized: dict = {}  # _memo_key -> (PushPullArgs, alpha vector of a number alpha or None)


def _memo_key(input, weight, bias, bias_out, alpha, options: dict):
    """What normalize's result depends on, hashable; None where it is not to be reused (traced code, a
    tensor mode, or arguments that are not tensors and hashable values: normalize then names the problem)."""
    if not _eager_reuse_allowed():
        return None
    try:
        alpha_key = _tensor_key(alpha) if isinstance(alpha, torch.Tensor) else (type(alpha), alpha)
        tensors = tuple(_tensor_key(t) for t in (input, weight, bias, bias_out))
        key = (tensors, alpha_key, tuple((name, _frozen(value)) for name, value in options.items()))
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _tensor_key(t):
    return None if t is None else (type(t), t.shape, t.dtype, t.device)


def _frozen(value):
    """value with its type (1, 1.0 and True are equal keys, but normalize accepts them differently)."""
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_frozen(v) for v in value)
    return type(value), value


def _normalize(
    input,
    weight,
    bias,
    bias_out,
    alpha,
    *,
    stride,
    padding,
    dilation,
    groups,
    pull,
    scale,
    avg_kernel,
    dual_output,
    padding_mode="zeros",
) -> tuple[PushPullArgs, torch.Tensor]:
    _check_tensors(input, weight, bias, bias_out, alpha)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be positive, got {dilation}")
    kernel_size = tuple(weight.shape[2:])
    padding, padding_extra = _resolve_padding(padding, kernel_size, stride, dilation)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {tuple(PADDING_MODES)}, got {padding_mode!r}")
    if pull not in PULL_MODES:
        raise ValueError(f"pull must be one of {PULL_MODES}, got {pull!r}")
    # Comparisons only (no math.isfinite): torch.compile with dynamic=True traces a float as a symbol, and
    # these comparisons specialize the compiled graph to its value (the pull kernel's size depends on it).
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 1 <= scale < math.inf:
        raise ValueError(f"scale must be a finite number >= 1, got {scale!r}")
    if isinstance(avg_kernel, bool) or not isinstance(avg_kernel, numbers.Integral) or avg_kernel < 0:
        raise ValueError(f"avg_kernel must be a non-negative int, got {avg_kernel!r}")
    if avg_kernel > 1 and avg_kernel % 2 == 0:
        raise ValueError(f"avg_kernel must be odd (or 0/1 for no pooling), got {avg_kernel}")
    if dual_output and bias_out is not None:
        raise ValueError("bias_out cannot be used with dual_output=True (the dual output has no combination)")
    args = PushPullArgs(
        stride,
        padding,
        dilation,
        int(groups),
        pull,
        float(scale),
        int(avg_kernel),
        bool(dual_output),
        padding_mode,
        padding_extra,
    )
    # Under torch.jit.trace the checks hold for the example input, and the ops check every later call.
    traced_quietly(_check_shapes, input, weight, bias, bias_out, args)
    return args, traced_quietly(_alpha_vector, alpha, weight)


def traced_quietly(fn, *args):
    """fn(*args), without torch.jit.trace's TracerWarnings: under a trace, sizes are traced tensors, and
    checks of them or Python ints made of them ("might cause the trace to be incorrect") are meant to be
    constants of the trace (a layer's kernel size, the example's validity)."""
    if not torch.jit.is_tracing():
        return fn(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return fn(*args)


def kernel_size_ints(weight: torch.Tensor) -> tuple[int, int]:
    """The kernel size as Python ints (under torch.jit.trace, constants: the Triton op's int[] arguments
    refuse traced sizes); call it through traced_quietly."""
    return tuple(int(k) for k in weight.shape[2:])


def _check_tensors(input, weight, bias, bias_out, alpha):
    named = {"input": input, "weight": weight, "bias": bias, "bias_out": bias_out}
    if isinstance(alpha, torch.Tensor):
        named["alpha"] = alpha
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if input is None or weight is None:
        raise TypeError("input and weight are required tensors")
    for name, t in named.items():
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {input.dtype}; all must match")
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}; all must be on one device")
    if input.dim() != 4:
        raise ValueError(
            f"input must be 3-D [C_in, H, W] or 4-D [N, C_in, H, W], got {input.dim()}-D shape {tuple(input.shape)}"
        )
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [C_out, C_in/groups, kh, kw], got shape {tuple(weight.shape)}")
    if not isinstance(alpha, torch.Tensor) and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)):
        raise TypeError(f"alpha must be a number or a tensor, got {type(alpha).__name__}")


def _resolve_padding(padding, kernel_size, stride, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """(leading padding, extra trailing padding) per dimension, as nn.Conv2d pads."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' needs stride 1, as in torch.nn.Conv2d")
        # nn.Conv2d: d * (k - 1) in all, the odd one at the end (bottom / right).
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        return (total[0] // 2, total[1] // 2), (total[0] % 2, total[1] % 2)
    padding = _pair(padding, "padding")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    return padding, (0, 0)


def _check_shapes(input, weight, bias, bias_out, args: PushPullArgs):
    c_in, c_out, groups = input.shape[1], weight.shape[0], args.groups
    if c_in % groups or c_out % groups:
        raise ValueError(f"groups={groups} must divide input channels ({c_in}) and weight's output channels ({c_out})")
    if weight.shape[1] * groups != c_in:
        raise ValueError(
            f"weight expects {weight.shape[1] * groups} input channels (shape {tuple(weight.shape)}, groups={groups}) "
            f"but input has {c_in}"
        )
    if min(weight.shape) < 1:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("bias_out", bias_out)):
        if t is not None and tuple(t.shape) != (c_out,):
            raise ValueError(f"{name} must have shape [{c_out}] (C_out), got {tuple(t.shape)}")
    kernel_size = tuple(weight.shape[2:])
    if args.pull == "upsample" and args.scale != 1 and any(k % 2 == 0 for k in kernel_size):
        raise ValueError(
            f"an even kernel size {kernel_size} with pull='upsample' and scale={args.scale} gives push and pull "
            "responses of different shapes in the 2020 layer; use an odd kernel or scale=1"
        )
    out_hw = args.output_size(input.shape[2:], kernel_size)
    if min(out_hw) < 1:
        raise ValueError(
            f"kernel size {kernel_size} (dilation {args.dilation}) is larger than the padded input "
            f"{tuple(h + 2 * p + e for h, p, e in zip(input.shape[2:], args.padding, args.padding_extra))}"
        )
    _check_padding_mode(input, kernel_size, args)
    if args.pull_output_size(input.shape[2:], kernel_size) != out_hw:
        raise ValueError(
            f"pull='upsample' with scale={args.scale} and dilation={args.dilation} gives a pull response of a "
            "different shape than the push response (the 2020 pull padding is not scaled by dilation); "
            "use dilation 1 or scale 1"
        )


def _check_padding_mode(input, kernel_size, args: PushPullArgs):
    """F.pad's limits on reflect / circular padding, named in the layer's terms. The pull convolution's
    padding is the larger one (upsample grows it), so it is the one checked."""
    if args.padding_mode not in ("reflect", "circular"):
        return
    left, right, top, bottom = args.pad_amounts(kernel_size, pull=True)
    for pad, size, dim in ((max(top, bottom), input.shape[2], "height"), (max(left, right), input.shape[3], "width")):
        if pad > size or (args.padding_mode == "reflect" and pad == size):
            limit = "smaller than" if args.padding_mode == "reflect" else "at most"
            raise ValueError(
                f"padding_mode={args.padding_mode!r} pads the input by {pad} (the pull convolution's "
                f"padding) but its {dim} is {size}: the padding must be {limit} the input size"
            )


def _alpha_vector(alpha, weight) -> torch.Tensor:
    c_out = weight.shape[0]
    if not isinstance(alpha, torch.Tensor):
        return torch.full((c_out,), float(alpha), dtype=weight.dtype, device=weight.device)
    if alpha.dim() == 0:
        return alpha.expand(c_out)
    if tuple(alpha.shape) == (c_out,):
        return alpha
    raise ValueError(f"alpha must be a number or a tensor of shape [] or [{c_out}] (C_out), got {tuple(alpha.shape)}")


def pull_operands(weight: torch.Tensor, args: PushPullArgs):
    """What the fused ops need to know of q(k): (pull_shift, pull_rows, pull_cols), at most one kind set.

    - invert: pull_shift [C_out] = max + min of each filter, so q = -k + pull_shift (autograd carries its
      gradient back to `weight` through amax/amin, sharing it evenly among ties, as autograd of the formula does);
    - upsample, scale != 1: q = -pull_rows @ k @ pull_cols^T, two fixed interpolation matrices;
    - upsample, scale 1: q = -k, all three None.
    """
    if args.pull == "invert":
        dims = (1, 2, 3)
        return weight.amax(dims) + weight.amin(dims), None, None
    if args.pull_is_negated_push:
        return None, None, None
    (kh, kw), (qh, qw) = weight.shape[2:], args.pull_size(tuple(weight.shape[2:]))
    rows = interpolation_matrix(kh, qh, weight.dtype, weight.device)
    cols = interpolation_matrix(kw, qw, weight.dtype, weight.device)
    return None, rows, cols
