"""The pull operands of a push kernel, derived once for inference and reused while the kernel is unchanged.

At training time the pull operands (options.pull_operands) are derived from the push kernel at every
call, so that gradients flow through them. At inference nothing flows back, and the kernel changes
only when someone changes it: the operands are kept, per weight tensor, under a key that any change
of the weight alters:
- in-place updates (optimizer steps, `copy_`, load_state_dict) bump `weight._version`;
- `.to(device/dtype)` of a module and `weight.data = ...` keep the tensor but change its device,
  dtype or data pointer;
- a replaced parameter is another tensor (entries are held by weak reference to their weight, and
  vanish with it).
The one change PyTorch does not record is an in-place update through `.data` (`weight.data.mul_(2)`:
`.data` has a version counter of its own, by design): after one, call `clear()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .options import PushPullArgs

_cache = WeakTensorKeyDictionary()  # weight -> (key, operands)


def _key(weight: torch.Tensor, args: PushPullArgs, dtype: torch.dtype) -> tuple:
    return (weight._version, weight.data_ptr(), weight.device, weight.dtype, tuple(weight.shape), args, dtype)


def cacheable(weight: torch.Tensor) -> bool:
    """Whether the operands of `weight` may be reused: no gradient can reach it, and it is a plain
    tensor seen in eager mode (not traced by torch.compile, export or torch.jit.trace, nor wrapped by torch.func) with a
    version counter (not an inference tensor)."""
    if torch.is_grad_enabled() and weight.requires_grad:
        return False
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or type(weight) not in (torch.Tensor, torch.nn.Parameter)
    ):
        return False
    if weight.is_inference():  # created under inference_mode: it has no version counter to key on
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(weight)


def cached_operands(
    weight: torch.Tensor, args: PushPullArgs, dtype: torch.dtype, derive: Callable[[torch.Tensor, PushPullArgs], tuple]
) -> tuple:
    """derive(weight, args) cast to `dtype`, computed once per state of `weight` (see module docstring).

    Computed outside inference mode, so that the kept tensors can also serve later calls made
    outside it (e.g. with grad enabled for the input only)."""
    key = _key(weight, args, dtype)
    entry = _cache.get(weight)
    if entry is not None and entry[0] == key:
        return entry[1]
    with torch.inference_mode(False), torch.no_grad():
        operands = tuple(None if t is None else t.to(dtype) for t in derive(weight, args))
    _cache[weight] = (key, operands)
    return operands


def clear() -> None:
    """Forget every kept pull operand: needed only after in-place updates through `.data`."""
    _cache.clear()
