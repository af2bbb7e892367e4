"""Fake kernels and autograd of the pushpull ops, registered beside the wrappers that call them.

Two op pairs share one contract (documented in `forward_fake` below):
- `torch.ops.pushpull.forward` / `.backward`: schema in csrc/pushpull.cpp, C++ kernels per backend
  (csrc/cpu, csrc/cuda);
- `torch.ops.pushpull.triton_forward` / `.triton_backward`: Triton kernels (kernels/), launched by
  pushpull_ext/triton_launch.py. On a GPU they are `triton_op`s, so torch.compile traces into the
  kernels; under TRITON_INTERPRET=1 they are opaque custom ops (the interpreter cannot run on the
  fake tensors a trace would feed it).
"""

from __future__ import annotations

import inspect
import typing

# typing.Sequence: the annotation the Triton ops' schema is inferred from, on every supported torch.
from typing import NamedTuple, Optional, Sequence  # noqa: UP035

import torch
from torch import Tensor

from ._ext import CPP_ERROR, TRITON_ERROR, TRITON_INTERPRET
from .options import conv_output_size, mask_bytes, mask_planes_shape, saved_bytes
from .reference import op_formula


class ForwardArgs(NamedTuple):
    """The arguments of the forward ops, by name (their schema: csrc/pushpull.cpp; tests/test_ops.py checks
    that the two agree)."""

    input: Tensor
    weight: Tensor
    pull_shift: Optional[Tensor]
    pull_rows: Optional[Tensor]
    pull_cols: Optional[Tensor]
    bias_in: Optional[Tensor]
    bias_out: Optional[Tensor]
    alpha: Tensor
    stride: Sequence[int]
    padding: Sequence[int]
    pull_padding: Sequence[int]
    dilation: Sequence[int]
    groups: int
    avg_kernel: int
    dual_output: bool
    save_masks: bool
    save_pull: bool = False

    def formula_args(self) -> tuple:
        """The arguments of reference.op_formula: all but the flags of what to save."""
        return tuple(self[: self._fields.index("save_masks")])


# The forward arguments that can receive a gradient, in the order the backward op returns them (and
# takes its output_mask).
GRADIENTS = ("input", "weight", "pull_shift", "bias_in", "bias_out", "alpha")
# The geometry the backward op takes after the tensors: the forward's, without save_masks and save_pull.
GEOMETRY = ForwardArgs._fields[ForwardArgs._fields.index("stride") : ForwardArgs._fields.index("save_masks")]
# The forward's tensors the backward op takes (after grad_output, before the masks) and saves for it.
SAVED = ("input", "weight", "pull_shift", "pull_rows", "pull_cols", "bias_in", "alpha")


def _typed(names) -> list:
    """[(name, annotation)] of forward arguments, as ForwardArgs declares them."""
    hints = typing.get_type_hints(ForwardArgs)
    return [(name, hints[name]) for name in names]


class BackwardArgs(
    NamedTuple(
        "BackwardArgs",
        [
            ("grad_output", Tensor),
            *_typed(SAVED),
            ("masks", Tensor),
            *_typed(GEOMETRY),
            ("output_mask", Sequence[bool]),
        ],
    )
):
    """The arguments of the backward ops, by name (built from ForwardArgs' fields; tests/test_ops.py checks
    them against the schemas too)."""

    __slots__ = ()

    @classmethod
    def after(cls, forward: ForwardArgs, grad_output, masks, output_mask) -> BackwardArgs:
        """The backward op's arguments after the forward op was called with `forward`."""
        saved, geometry = ((getattr(forward, name) for name in names) for names in (SAVED, GEOMETRY))
        return cls(grad_output, *saved, masks, *geometry, output_mask)

    def forward_args(self, bias_out=None, dual_output=None, save_masks=False) -> ForwardArgs:
        """The forward arguments these came from (bias_out is not among them), or a variant of them."""
        same = {name: getattr(self, name) for name in (*SAVED, *GEOMETRY)}
        if dual_output is not None:
            same["dual_output"] = dual_output
        return ForwardArgs(**same, bias_out=bias_out, save_masks=save_masks)


def forward_fake(*args):
    """Shapes of (output, masks).

    output: [N, C_out (2*C_out if dual_output), Ho, Wo], contiguous, input's dtype.
    masks: uint8, flat: the planes [2, N, ceil(C_out/8), Ho, Wo] in that order (mask_planes); bit o % 8
    of byte o // 8 is ReLU'(P) (plane 0) and ReLU'(Q') (plane 1) of channel o; empty when save_masks is
    False. Flat because only the backward reads it: a saved activation of rank 1 has one layout, so no
    compiler's (torch.compile's) choice of strides for the forward's outputs can disagree with it. With
    save_pull (the CPU op only; options.saved_bytes) the buffer goes on with ReLU(Q'), which a trainable
    alpha's gradient then reads instead of recomputing the pull response.
    """
    a = ForwardArgs(*args)
    n, c_out = a.input.shape[0], a.weight.shape[0]
    ho, wo = (
        conv_output_size(a.input.shape[2 + i], a.weight.shape[2 + i], a.stride[i], a.padding[i], a.dilation[i])
        for i in range(2)
    )
    out = a.input.new_empty((n, 2 * c_out if a.dual_output else c_out, ho, wo))
    masks_length = saved_bytes(n, c_out, ho, wo, a.input.dtype, a.save_pull) if a.save_masks else 0
    return out, a.input.new_empty((masks_length,), dtype=torch.uint8)


def mask_planes(masks: Tensor, output_shape, c_out: int) -> Tensor:
    """The flat masks of a forward whose output has `output_shape` [N, C, Ho, Wo], as their planes (the
    saved buffer's first mask_bytes)."""
    n, _, ho, wo = output_shape
    return masks[: mask_bytes(n, c_out, ho, wo)].view(mask_planes_shape(n, c_out, ho, wo))


def backward_fake(grad_output, input, weight, *rest):
    """(grad_input, grad_weight, grad_pull_shift, grad_bias_in, grad_bias_out, grad_alpha); entries
    not asked for in output_mask are empty tensors."""
    output_mask, c_out = rest[-1], weight.shape[0]
    shapes = (input.shape, weight.shape, (c_out,), (c_out,), (c_out,), (c_out,))
    return tuple(input.new_empty(shape if wanted else (0,)) for shape, wanted in zip(shapes, output_mask))


def _placeholder(t: Tensor) -> Tensor:
    """A tensor of t's shape that holds no memory: stands in for inputs backward does not read."""
    return t.new_empty(()).expand(t.shape)


def is_channels_last(t: Tensor) -> bool:
    """A 4-D tensor in channels_last layout (and not also contiguous, as size-1 dims allow)."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _needed(ctx) -> dict:
    """{gradient name: whether autograd asks for it}, for the GRADIENTS."""
    return {name: ctx.needs_input_grad[ForwardArgs._fields.index(name)] for name in GRADIENTS}


def _make_autograd(backward_op):
    def setup_context(ctx, inputs, output):
        args = ForwardArgs(*inputs)
        ctx.options = tuple(getattr(args, name) for name in GEOMETRY)
        need = _needed(ctx)
        # The input is read only by the weight / pull_shift gradients and for alpha (to recompute the
        # pull response where the forward did not save ReLU(Q'), and by the double backward's formula);
        # the weight only by the input gradient and for alpha.
        keep_input = need["weight"] or need["pull_shift"] or need["alpha"]
        keep_weight = need["input"] or need["alpha"]
        ctx.placeholders = (
            None if keep_input else _placeholder(args.input),
            None if keep_weight else _placeholder(args.weight),
        )
        kept = {"input": keep_input, "weight": keep_weight}
        ctx.save_for_backward(*(getattr(args, name) if kept.get(name, True) else None for name in SAVED), output[1])
        ctx.mark_non_differentiable(output[1])
        # Else autograd hands backward a zero-filled "gradient" of the saved buffer (masks, and ReLU(Q') with
        # save_pull: an output-sized field) on every call, for nothing.
        ctx.set_materialize_grads(False)
        ctx.input_channels_last = is_channels_last(args.input)

    def backward(ctx, grad_output, _grad_masks):
        if grad_output is None:  # no gradient reached the output (grads are not materialized): none flows back
            return (None,) * len(ForwardArgs._fields)
        *saved, masks = ctx.saved_tensors  # SAVED, input / weight None where not kept
        need = list(_needed(ctx).values())
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            grads = _differentiable_grads(grad_output, saved, masks, ctx.placeholders, ctx.options, need)
            return _by_argument(grads, need)
        saved[:2] = [placeholder if t is None else t for t, placeholder in zip(saved[:2], ctx.placeholders)]
        # The kernels accumulate in float32 with ATen ops, which autocast (still on if backward runs inside
        # its context) must not cast down again.
        with torch.autocast(grad_output.device.type, enabled=False):
            backward_args = (grad_output.contiguous(), *saved, masks, *ctx.options, need)
            grads = list(_call_without_autograd(backward_op, backward_args, _plain_eager(backward_args)))
        if ctx.input_channels_last and need[0]:  # as nn.Conv2d: the input's gradient in the input's layout
            grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
        return _by_argument(grads, need)

    return setup_context, backward


def _by_argument(grads, need) -> tuple:
    """The backward op's gradients (GRADIENTS order) at their forward arguments' positions."""
    by_name = {name: grad for name, wanted, grad in zip(GRADIENTS, need, grads) if wanted}
    return tuple(by_name.get(name) for name in ForwardArgs._fields)


def unpack_masks(masks: Tensor, output_shape, channels: int, dtype: torch.dtype) -> Tensor:
    """The packed ReLU masks (forward_fake) as 0/1 values [2, N, channels, Ho, Wo] of `dtype`."""
    masks = mask_planes(masks, output_shape, channels)
    bits = torch.arange(8, device=masks.device, dtype=torch.uint8).view(1, 1, 1, 8, 1, 1)
    unpacked = (masks.unsqueeze(3) >> bits) & 1  # [2, N, bytes, 8, Ho, Wo]: bit b of byte j is channel 8j + b
    return unpacked.flatten(2, 3)[:, :, :channels].to(dtype)


def _differentiable_grads(grad_output, saved, masks, placeholders, options, need) -> list:
    """The gradients of the backward op as autograd of the formula with the forward's ReLU masks held
    fixed (reference.combine): exact, since the layer is that masked linear map near the point, and
    differentiable in every input and in grad_output (double backward, gradient penalties).

    The map is linear in each of input and weight, so the gradient of one never reads the other's
    value: where backward kept only a placeholder, zeros of its shape stand in."""
    input, weight, pull_shift, pull_rows, pull_cols, bias_in, alpha = saved
    if masks.numel() == 0:
        raise RuntimeError("pushpull: double backward needs the ReLU masks of the forward (save_masks=True)")
    stand_in = [ph.new_zeros(ph.shape) if t is None else t for t, ph in zip((input, weight), placeholders)]
    c_out = stand_in[1].shape[0]
    bias_out = grad_output.new_zeros(c_out) if need[4] else None
    leaves = [*stand_in, pull_shift, bias_in, bias_out, alpha]
    leaves = [t.detach().requires_grad_() if wanted and not t.requires_grad else t for t, wanted in zip(leaves, need)]
    with torch.enable_grad():
        out = op_formula(
            leaves[0],
            leaves[1],
            leaves[2],
            pull_rows,
            pull_cols,
            leaves[3],
            leaves[4],
            leaves[5],
            *options,
            masks=unpack_masks(masks, grad_output.shape, c_out, grad_output.dtype),
        )
        wanted = [t for t, n in zip(leaves, need) if n]
        grads = iter(torch.autograd.grad(out, wanted, grad_output, create_graph=True, materialize_grads=True))
    return [next(grads) if n else None for n in need]


def _no_double_backward(ctx, *grads):
    raise RuntimeError("pushpull: double backward (gradient of the gradient) is not supported")


def _eager_function(forward_op, setup_context, backward) -> type[torch.autograd.Function]:
    """The op's registered autograd (the same setup_context and backward) as an autograd.Function whose
    forward calls the op below the Autograd key: what `call_forward` applies in plain eager mode. The
    registered autograd goes through Python on every call and rebuilds the schema's argument list
    (torch.library's fill_defaults: ~90 us for this op's 17 arguments on the 2-core EPYC, more than a
    CIFAR stem's convolution of one image)."""

    # forward(ctx, ...) rather than a separate setup_context: apply() then binds no signature (inspect's,
    # another ~45 us a call). functorch's transforms, which need the separate one, never come here.
    class EagerForward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = forward_op(*args)
            setup_context(ctx, args, output)
            return output

    EagerForward.backward = staticmethod(backward)
    return EagerForward


# forward op -> its EagerForward (_eager_function), for the ops _register registered.
_EAGER_FUNCTIONS: dict = {}


# torch.compiler.is_exporting where this torch has it; besides, strict export traces with Dynamo (is_compiling)
# and non-strict export under a dispatch mode (the dispatch stack), which _plain_eager checks too.
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _plain_eager(args) -> bool:
    """Whether nothing but the dispatcher's own kernels would see an op call with these arguments: no trace,
    compile or export, no TorchDispatchMode or TorchFunctionMode, no tensor subclass with
    __torch_function__ (nn.Parameter has none)."""
    tensors = [t for t in args if isinstance(t, Tensor)]
    return not (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or _is_exporting()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._len_torch_function_stack()
        or torch.overrides.has_torch_function(tensors)
    )


def call_forward(forward_op, args: ForwardArgs):
    """forward_op(*args), its autograd as registered, by the shortest dispatch the call allows: in plain
    eager mode (_plain_eager) straight to the backend's kernel, through EagerForward where autograd
    records it (save_masks: a gradient is wanted); else through the dispatcher, so that traces,
    compilers and modes see the op itself."""
    plain = _plain_eager(args)
    if plain and args.save_masks and torch.is_grad_enabled():
        return _EAGER_FUNCTIONS[forward_op].apply(*args)
    return _call_without_autograd(forward_op, args, plain)


def _call_without_autograd(op, args, plain: bool):
    """op(*args) where autograd is not to record it: in plain eager mode below the Autograd key (the
    registered autograd would only go through Python to get there), else through the dispatcher."""
    if not plain:
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _register(forward_op_name: str, backward_op_name: str):
    torch.library.register_fake(forward_op_name)(forward_fake)
    torch.library.register_fake(backward_op_name)(backward_fake)
    namespace = torch.ops.pushpull
    forward_op, backward_op = (getattr(namespace, name.split("::")[1]) for name in (forward_op_name, backward_op_name))
    setup_context, backward = _make_autograd(backward_op)
    torch.library.register_autograd(forward_op_name, backward, setup_context=setup_context)
    _EAGER_FUNCTIONS[forward_op] = _eager_function(forward_op, setup_context, backward)
    torch.library.register_autograd(
        backward_op_name, _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )


if CPP_ERROR is None:
    _register("pushpull::forward", "pushpull::backward")


def _empty_batch_forward(*args):
    out, masks = forward_fake(*args)
    return out.zero_(), masks


def _empty_batch_backward(grad_output, input, weight, *rest):
    return tuple(g.zero_() for g in backward_fake(grad_output, input, weight, *rest))


def _taking(arguments: type, returns):
    """Gives the decorated fn(*args, **kwargs) the signature of a function of `arguments`' fields (a
    NamedTuple), with their annotations and defaults: the signature torch.library infers the op's schema from."""
    hints = typing.get_type_hints(arguments)
    defaults = arguments._field_defaults
    parameters = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=hints[name],
            default=defaults.get(name, inspect.Parameter.empty),
        )
        for name in arguments._fields
    ]

    def decorate(fn):
        fn.__signature__ = inspect.Signature(parameters, return_annotation=returns)
        return fn

    return decorate


def _define_triton_ops():
    from . import triton_launch

    # Opaque custom ops under the interpreter (see module docstring); traceable triton_ops on a GPU.
    define = torch.library.custom_op if TRITON_INTERPRET else torch.library.triton_op

    @define("pushpull::triton_forward", mutates_args=())
    @_taking(ForwardArgs, tuple[Tensor, Tensor])
    def triton_forward(*args, **kwargs) -> tuple[Tensor, Tensor]:
        forward = ForwardArgs(*args, **kwargs)
        if forward.input.shape[0] == 0:  # no program to launch
            return _empty_batch_forward(*forward)
        return triton_launch.forward(forward)

    @define("pushpull::triton_backward", mutates_args=())
    @_taking(BackwardArgs, tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor])
    def triton_backward(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        backward = BackwardArgs(*args, **kwargs)
        if backward.input.shape[0] == 0:
            return _empty_batch_backward(*backward)
        return triton_launch.backward(backward)

    _register("pushpull::triton_forward", "pushpull::triton_backward")


TRITON_OP_ERROR = TRITON_ERROR
if TRITON_ERROR is None:
    try:
        _define_triton_ops()
    except ImportError as error:  # the launcher or kernels failed to import
        TRITON_OP_ERROR = f"the Triton kernels could not be loaded ({error})"
