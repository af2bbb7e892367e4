"""What the per-layer benchmark times (`python -m pushpull_ext.bench`): the providers of one layer, the
calls of each mode, and the FLOPs / bytes model its GFLOP/s, GB/s and roofline figures come from.

Providers: "reference" (the eager formula, the baseline), "conv+relu" (the plain nn.Conv2d + ReLU of the
same geometry: what the layer costs at least, as a convolution), "stacked+compile", "compiled-reference"
and our backends (cpu; cuda, triton on GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F

from .functional import push_pull_conv2d, resolve_backend
from .options import conv_output_size, normalize, upsampled_size
from .reference import pooled, pull_kernel, push_pull_reference, responses
from .shapes import Case, CaseInputs

BASELINE = "reference"
CONV_RELU = "conv+relu"
COMPILED = ("stacked+compile", "compiled-reference")
OUR_BACKENDS = ("cpu", "cuda", "triton")
PROVIDERS = (BASELINE, CONV_RELU) + COMPILED + ("ours",)
DEFAULT_PROVIDERS = (BASELINE, CONV_RELU, "ours")  # without --full: the torch.compile ones cost most of the time


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


# ---------------------------------------------------------------- the FLOPs / bytes model (written once)


def _geometry(case: Case):
    ho = conv_output_size(case.h, case.kernel, case.stride, case.padding, 1)
    wo = conv_output_size(case.w, case.kernel, case.stride, case.padding, 1)
    pull = upsampled_size(case.kernel, case.scale) if case.pull == "upsample" and case.scale != 1 else case.kernel
    return ho, wo, pull


def work(case: Case, batch: int, itemsize: int, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call in `mode`, for the formula as the reference computes it.

    FLOPs: forward = 2 MACs of the push conv (k x k) and of the pull conv (q x q), a*a per output for
    the average, 5 per output for bias / ReLUs / combination; backward = the weight gradient of both
    convolutions (2 MACs each), their input gradient when the input needs one, the same pooling and
    elementwise work. Bytes: forward = input + weights (+ biases, alpha) + output; backward =
    grad_output + input + weights + every gradient written. fwdbwd = both; inference = forward.
    """
    ho, wo, q = _geometry(case)
    outputs = batch * case.c_out * ho * wo
    macs = outputs * case.c_in * (case.kernel**2 + q**2)
    pointwise = outputs * (5 + (case.avg_kernel**2 if case.avg_kernel > 1 else 0))
    fwd_flops = 2 * macs + pointwise
    bwd_flops = 2 * macs * (2 if case.input_grad else 1) + pointwise
    x = batch * case.c_in * case.h * case.w
    params = case.c_out * case.c_in * case.kernel**2 + case.c_out * (case.bias_in + case.bias_out + 1)
    fwd_bytes = (x + params + outputs) * itemsize
    bwd_bytes = (outputs + x + 2 * params + (x if case.input_grad else 0)) * itemsize
    flops = {"fwd": fwd_flops, "inference": fwd_flops, "bwd": bwd_flops, "fwdbwd": fwd_flops + bwd_flops}[mode]
    nbytes = {"fwd": fwd_bytes, "inference": fwd_bytes, "bwd": bwd_bytes, "fwdbwd": fwd_bytes + bwd_bytes}[mode]
    return float(flops), float(nbytes)


def roofline_percent(flops: float, nbytes: float, seconds: float, peaks: dict) -> Optional[float]:
    """Achieved FLOP/s as a percentage of min(peak FLOP/s, intensity x peak bandwidth)."""
    if not peaks or seconds <= 0:
        return None
    attainable = min(peaks["flops_per_s"], flops / nbytes * peaks["bytes_per_s"])
    return 100.0 * flops / seconds / attainable


# ---------------------------------------------------------------- providers


def _epilogue(push, pull, alpha, bias_out, avg_kernel: int):
    pull = pooled(pull, avg_kernel)
    out = F.relu(push) - alpha.view(1, -1, 1, 1) * F.relu(pull)
    return out if bias_out is None else out + bias_out.view(1, -1, 1, 1)


def _stacked(x, w, b_in, b_out, alpha, args, epilogue):
    """Plain PyTorch at its best: invert stacks [k; q] into one convolution (same size); upsample, whose
    pull kernel is larger, runs two convolutions; then the compiled epilogue."""
    conv = dict(stride=args.stride, dilation=args.dilation, groups=args.groups)
    q = pull_kernel(w, args.pull, args.scale)
    if q.shape == w.shape and args.groups == 1:
        bias = None if b_in is None else torch.cat([b_in, -b_in])
        push, pull = F.conv2d(x, torch.cat([w, q]), bias, padding=args.padding, **conv).split(w.shape[0], dim=1)
    else:
        push = F.conv2d(x, w, b_in, padding=args.padding, **conv)
        pull = F.conv2d(x, q, None if b_in is None else -b_in, padding=args.pull_padding(tuple(w.shape[2:])), **conv)
    return epilogue(push, pull, alpha, b_out)


def _normalized(inputs: CaseInputs):
    t = inputs.tensors
    return normalize(
        t["input"],
        t["weight"],
        t["bias"],
        t["bias_out"],
        t["alpha"],
        dilation=1,
        groups=1,
        dual_output=False,
        **inputs.case.options(),
    )


# A float32 ReLU input within this fraction of its field's largest magnitude can round to either side of 0
# (each float32 operation carries a relative error of 6e-8, a 147-term dot product or the cancellation of
# invert's m * S - P0 some 10 to 100 times that): there the ReLU's derivative is decided by rounding, in eager
# PyTorch as in our kernels, and either side is right.
KINK_BAND = 1e-4


def away_from_kinks(inputs: CaseInputs) -> torch.Tensor:
    """Where the output's derivative is decided by the formula rather than by rounding: False at the outputs
    whose ReLU input (P, or the pooled pull response Q') lies within KINK_BAND of 0, relative to its
    field's largest magnitude, evaluated in float64. The same for every provider (conv+relu's ReLU input
    is P)."""
    exact = inputs.cast(torch.float64)
    args, _alpha = _normalized(exact)
    t = exact.tensors
    with torch.no_grad():
        push, pull = responses(t["input"], t["weight"], t["bias"], args)
        pull = pooled(pull, args.avg_kernel)
    far_push, far_pull = (v.abs() > KINK_BAND * v.abs().max() for v in (push, pull))
    if args.dual_output:
        return torch.cat([far_push, far_pull], dim=1)
    return far_push & far_pull


def build_provider(name: str, inputs: CaseInputs) -> Callable[[], torch.Tensor]:
    """A no-argument callable computing the layer's output on `inputs` with provider `name`."""
    t = inputs.tensors
    if name == CONV_RELU:
        return ConvRelu(inputs)
    if name in (BASELINE,) + OUR_BACKENDS:
        if name != BASELINE:
            _check_backend(name, inputs.input)
        return functools.partial(inputs.call, push_pull_conv2d, backend=name)
    args, alpha = _normalized(inputs)
    tensors = (t["input"], t["weight"], t["bias"], t["bias_out"])
    if name == "compiled-reference":
        compiled = torch.compile(functools.partial(push_pull_reference, args=args), fullgraph=True, dynamic=False)
        return lambda: compiled(*tensors, alpha)
    if name == "stacked+compile":
        epilogue = torch.compile(
            functools.partial(_epilogue, avg_kernel=args.avg_kernel), fullgraph=True, dynamic=False
        )
        return lambda: _stacked(*tensors, alpha, args, epilogue)
    raise ValueError(f"unknown provider {name!r}")


def _check_backend(name: str, input: torch.Tensor) -> None:
    if name == "triton" and input.device.type != "cuda":
        raise Skip("triton runs on CPU only under the TRITON_INTERPRET debugger; not benchmarked")
    try:
        resolve_backend(name, input)
    except RuntimeError as error:
        raise Skip(str(error)) from None


class ConvRelu:
    """The plain convolution of the layer's geometry and a ReLU, F.relu(F.conv2d(x, k, bias)): what an
    nn.Conv2d + ReLU costs in its place. Its bias is the layer's b_in (2020) or b_out (2024), as
    nn.Conv2d(bias=True); the input needs a gradient as in the layer. Gradients: input (when the layer's
    does), weight, bias; no pull kernel, no alpha."""

    def __init__(self, inputs: CaseInputs):
        t, case = inputs.tensors, inputs.case
        self.x, self.weight = t["input"], t["weight"]
        bias_name = "bias" if t["bias"] is not None else "bias_out" if t["bias_out"] is not None else None
        self.bias = None if bias_name is None else t[bias_name]
        self.conv = dict(stride=case.stride, padding=case.padding)
        self.grad_names = tuple(n for n in ("input", "weight", bias_name) if n and t[n].requires_grad)
        self.tensors = t

    def __call__(self) -> torch.Tensor:
        return F.relu(F.conv2d(self.x, self.weight, self.bias, **self.conv))

    def grad_tensors(self) -> list:
        return [self.tensors[name] for name in self.grad_names]


def grad_names(fn: Callable, inputs: CaseInputs) -> tuple:
    """The names of the tensors a provider differentiates: its own (conv+relu) or the layer's."""
    return getattr(fn, "grad_names", inputs.grad_names)


def grad_tensors(fn: Callable, inputs: CaseInputs) -> list:
    return fn.grad_tensors() if hasattr(fn, "grad_tensors") else inputs.grad_tensors()


# ---------------------------------------------------------------- what a mode runs


def mode_callable(fn: Callable, inputs: CaseInputs, mode: str, grad_out: torch.Tensor) -> Callable[[], object]:
    grads = grad_tensors(fn, inputs)
    if mode == "fwd":
        return fn
    if mode == "inference":

        def inference():
            with torch.no_grad():
                return fn()

        return inference
    if mode == "fwdbwd":
        return lambda: torch.autograd.grad(fn(), grads, grad_out)
    if mode == "bwd":
        out = fn()  # one graph, kept alive: only the backward is timed
        return lambda: torch.autograd.grad(out, grads, grad_out, retain_graph=True)
    raise ValueError(f"unknown mode {mode!r}")


def forward_backward(fn: Callable, inputs: CaseInputs, grad_out: torch.Tensor):
    out = fn()
    return out.detach(), [g.detach() for g in torch.autograd.grad(out, grad_tensors(fn, inputs), grad_out)]
