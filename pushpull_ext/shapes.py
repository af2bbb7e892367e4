"""The shapes of the papers' push-pull layers, written once, and the tensors of a case.

Tests and benchmarks import `CASES` (or `case_by_name`) and build a case's tensors with
`make_inputs`; nothing else lists these shapes. `make_inputs` is also the builder of the tests' option
grid (tests/support/cases.py), whose cases add groups, dilation, the dual output, rectangular kernels
and other alpha forms. `parse_case` turns a command-line string into an
extra, arbitrary case. The tolerance rules (README.md, "Testing") are here too (`tolerance`, `within_tolerance`),
so that the benchmark and the tests judge errors the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class Case:
    """One push-pull layer: a layer of the papers (CASES), or of the tests' option grid.

    `kernel` is the kernel's height, `kernel_w` its width (None: square); `stride`, `padding` and
    `dilation` are ints, or (h, w) pairs in the test grid. `alpha`: "number" (a fixed Python float,
    `alpha_value`), "scalar" (a 0-d tensor) or "per-channel" (a trainable [C_out] tensor: `alpha_value`,
    plus `alpha_spread` times uniform [0, 1) noise per channel; the 2024 module with
    trainable_pull_inhibition starts at alpha_value). `input_grad`: whether the layer's input needs a
    gradient (False for stems, whose input is the image).
    """

    name: str
    layer: str
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: int
    stride: int
    padding: int
    pull: str
    scale: float = 2.0
    avg_kernel: int = 0
    bias_in: bool = False
    bias_out: bool = False
    alpha: str = "number"
    alpha_value: float = 1.0
    input_grad: bool = True
    kernel_w: Optional[int] = None
    dilation: int = 1
    groups: int = 1
    dual_output: bool = False
    alpha_spread: float = 0.0

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.kernel, self.kernel if self.kernel_w is None else self.kernel_w)

    def options(self) -> dict:
        """Keyword arguments of `push_pull_conv2d` other than the tensors (the geometry beyond the papers'
        only where a case has it)."""
        options = dict(
            stride=self.stride, padding=self.padding, pull=self.pull, scale=self.scale, avg_kernel=self.avg_kernel
        )
        extra = dict(dilation=self.dilation, groups=self.groups, dual_output=self.dual_output)
        return {**options, **{name: value for name, value in extra.items() if value != _DEFAULTS[name]}}

    def describe(self) -> str:
        pull = f"upsample s={self.scale:g}" if self.pull == "upsample" else "invert"
        if self.avg_kernel > 1:
            pull += f", avg {self.avg_kernel}"
        return (
            f"{self.c_in}->{self.c_out} {self.h}x{self.w} k{self.kernel} s{self.stride} p{self.padding}, {pull}, "
            f"bias_in={self.bias_in}, bias_out={self.bias_out}, alpha={self.alpha}, input_grad={self.input_grad}"
        )


_DEFAULTS = {f.name: f.default for f in fields(Case)}

# The two papers' layers. 2020, PPmodule2d: push = Conv2d(bias=True) -> b_in; alpha 1, not trained;
# pull = bilinear x2 (3x3 -> 7x7). 2024, PushPullConv2DUnit: push_conv without bias, b_out after the
# combination, trainable [C_out] alpha.
_LAYER_2020 = dict(kernel=3, stride=1, padding=1, pull="upsample", scale=2.0, bias_in=True, alpha="number")
_LAYER_2024 = dict(pull="invert", bias_out=True, alpha="per-channel", input_grad=False)


def _paper_2020(name, layer, n, c_in, c_out, hw, input_grad):
    return Case(name, layer, n, c_in, c_out, hw, hw, input_grad=input_grad, **_LAYER_2020)


def _paper_2024(name, layer, n, c_in, c_out, hw, kernel, stride, padding, avg_kernel):
    geometry = dict(kernel=kernel, stride=stride, padding=padding, avg_kernel=avg_kernel)
    return Case(name, layer, n, c_in, c_out, hw, hw, **geometry, **_LAYER_2024)


CASES: tuple[Case, ...] = (
    _paper_2020("cifar-stem-2020", "ResNet-20-pp conv1", 128, 3, 16, 32, input_grad=False),
    _paper_2020("cifar-b1-2020", "ResNet-20-b1 block-1 conv", 128, 16, 16, 32, input_grad=True),
    _paper_2024("imagenet-stem-2024", "ResNet-50 + PP3 conv1", 256, 3, 64, 224, 7, 2, 3, avg_kernel=3),
    _paper_2020("imagenet-b1-2020", "ResNet-50-b1 middle conv", 256, 64, 64, 56, input_grad=True),
    _paper_2024("cifar-stem-2024", "ResNet-18 CIFAR + PP5 conv1", 128, 3, 64, 32, 3, 1, 1, avg_kernel=5),
)


def case_by_name(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(f"unknown shape {name!r}; known: {', '.join(c.name for c in CASES)}")


CASE_FORMAT = "N,Cin,Cout,H,W,k,stride,pad,pull[,scale|avg]"


def case_from_text(text: str) -> Case:
    """A paper shape by name, or an arbitrary case in CASE_FORMAT (parse_case): the command lines' --shapes."""
    return case_by_name(text) if text in {c.name for c in CASES} else parse_case(text)


def parse_case(text: str) -> Case:
    """An arbitrary case from "N,Cin,Cout,H,W,k,stride,pad,pull[,scale|avg]".

    pull "upsample" (optional 10th field: scale, default 2) is set up as the 2020 layer (b_in, alpha 1);
    pull "invert" (optional 10th field: avg kernel, default 0) as the 2024 one (b_out, trainable alpha).
    The input needs a gradient (an inner layer). Example: "32,64,64,56,56,3,1,1,upsample,2".
    """
    fields = [f.strip() for f in text.split(",")]
    if len(fields) not in (9, 10) or fields[8] not in ("upsample", "invert"):
        raise ValueError(f"--shape expects {CASE_FORMAT} (pull: upsample or invert), got {text!r}")
    n, c_in, c_out, h, w, k, stride, pad = (int(f) for f in fields[:8])
    extra = fields[9] if len(fields) == 10 else None
    name = "custom-" + "x".join(fields).replace(",", "x")
    if fields[8] == "upsample":
        case = _paper_2020(name, "custom", n, c_in, c_out, h, input_grad=True)
        return replace(case, w=w, kernel=k, stride=stride, padding=pad, scale=float(extra) if extra else 2.0)
    case = _paper_2024(name, "custom", n, c_in, c_out, h, k, stride, pad, avg_kernel=int(extra) if extra else 0)
    return replace(case, w=w, input_grad=True)


@dataclass
class CaseInputs:
    """The tensors of a case on one device/dtype. `tensors` holds input, weight, bias, bias_out, alpha
    (bias / bias_out None when the layer has none; alpha a float or a [C_out] tensor)."""

    case: Case
    batch: int
    tensors: dict
    grad_names: tuple = field(default_factory=tuple)

    @property
    def input(self) -> torch.Tensor:
        return self.tensors["input"]

    def grad_tensors(self) -> list:
        """The tensors that get a gradient, in `grad_names` order."""
        return [self.tensors[name] for name in self.grad_names]

    def call(self, fn, **extra):
        """fn(input, weight, bias, bias_out=..., alpha=..., **case options, **extra)."""
        t = self.tensors
        return fn(
            t["input"], t["weight"], t["bias"], bias_out=t["bias_out"], alpha=t["alpha"], **self.case.options(), **extra
        )

    def cast(self, dtype: torch.dtype, device=None) -> CaseInputs:
        """Copies with the same values in another dtype/device (and the same requires_grad)."""

        def convert(t):
            if not isinstance(t, torch.Tensor):
                return t
            return t.detach().to(device=device or t.device, dtype=dtype).requires_grad_(t.requires_grad)

        return CaseInputs(self.case, self.batch, {k: convert(v) for k, v in self.tensors.items()}, self.grad_names)


def make_inputs(
    case: Case, device="cpu", dtype: torch.dtype = torch.float32, batch: Optional[int] = None, seed: int = 0
) -> CaseInputs:
    """The case's tensors: input ~ N(0, 1) (batch `batch` or the case's N), parameters initialised as
    nn.Conv2d does (uniform +-1/sqrt(fan_in)), alpha as Case describes. Values are drawn in float64 on
    the CPU from `seed`, so every device and dtype sees the same numbers. requires_grad is set as the
    layer needs: weight always, bias / bias_out / tensor alpha when present, input if input_grad."""
    gen = torch.Generator().manual_seed(seed)
    n = case.n if batch is None else batch
    kh, kw = case.kernel_size
    c_group = case.c_in // case.groups
    bound = 1 / math.sqrt(c_group * kh * kw)  # fan_in of one output channel

    def uniform(*shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound

    def put(t, grad):
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    x = torch.randn(n, case.c_in, case.h, case.w, generator=gen, dtype=torch.float64)
    tensors = {
        "input": put(x, case.input_grad),
        "weight": put(uniform(case.c_out, c_group, kh, kw), True),
        "bias": put(uniform(case.c_out), True) if case.bias_in else None,
        "bias_out": put(uniform(case.c_out), True) if case.bias_out else None,
        "alpha": _alpha(case, gen),
    }
    if isinstance(tensors["alpha"], torch.Tensor):
        tensors["alpha"] = put(tensors["alpha"], True)
    grad_names = tuple(k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.requires_grad)
    return CaseInputs(case, n, tensors, grad_names)


def _alpha(case: Case, gen: torch.Generator):
    """The case's alpha: a float, or a float64 tensor (0-d, or [C_out] with the per-channel spread)."""
    if case.alpha == "number":
        return case.alpha_value
    if case.alpha == "scalar":
        return torch.tensor(case.alpha_value, dtype=torch.float64)
    alpha = torch.full((case.c_out,), case.alpha_value, dtype=torch.float64)
    if case.alpha_spread:  # (no draw otherwise: the papers' cases keep their numbers)
        alpha += case.alpha_spread * torch.rand(case.c_out, generator=gen, dtype=torch.float64)
    return alpha


# ---------------------------------------------------------------- the tolerance rules

# Relative tolerance per dtype (float32: with TF32 off). Low-precision dtypes have none of their own:
# they must stay within LOW_PRECISION_FACTOR x the error of eager PyTorch in the same dtype.
RELATIVE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
LOW_PRECISION_FACTOR = 2.0


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    """max |value - exact| / max |exact| (the error relative to the tensor's scale), in float64."""
    diff = (value.detach().double() - exact.detach().double()).abs().max().item()
    scale = exact.detach().double().abs().max().item()
    return diff / scale if scale > 0 else diff


def tolerance(dtype: torch.dtype, eager_error: Optional[float] = None) -> float:
    """The relative error allowed for `dtype`: the fixed figure, or for float16/bfloat16 (and float32
    with TF32 on, passed as eager_error) LOW_PRECISION_FACTOR times eager PyTorch's own error."""
    if dtype in RELATIVE_TOLERANCE and eager_error is None:
        return RELATIVE_TOLERANCE[dtype]
    if eager_error is None:
        raise ValueError(f"{dtype} has no fixed tolerance: pass eager PyTorch's error in that dtype")
    return max(LOW_PRECISION_FACTOR * eager_error, RELATIVE_TOLERANCE.get(dtype, 0.0))


def within_tolerance(
    value: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, eager_error: Optional[float] = None
) -> bool:
    return relative_error(value, exact) <= tolerance(dtype, eager_error)
