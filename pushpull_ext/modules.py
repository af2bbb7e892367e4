"""`PushPullConv2d`: a drop-in for torch.nn.Conv2d computing the push-pull response."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .functional import push_pull_conv2d
from .options import BACKENDS, PADDING_MODES, PULL_MODES, layer_options


class PushPullConv2d(nn.Module):
    """Same constructor arguments and defaults as nn.Conv2d, plus the push-pull ones.

    Parameters: `weight` (the push kernel; the pull kernel is derived from it at every training call,
    kept at inference until the weight changes, and is never a parameter), `bias` (the 2020 bias inside
    the ReLUs, like Conv2d's `bias=True`), `bias_out` (the 2024 bias after the combination, when
    `bias_out=True`), and `alpha` when `train_alpha=True` (shape [C_out]; used through a ReLU when
    `alpha_relu=True`, as the 2020 layer does).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        pull: str = "upsample",
        scale: float = 2.0,
        alpha: float = 1.0,
        train_alpha: bool = False,
        alpha_relu: bool = False,
        bias_out: bool = False,
        avg_kernel: int = 0,
        dual_output: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {tuple(PADDING_MODES)}, got {padding_mode!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if pull not in PULL_MODES:
            raise ValueError(f"pull must be one of {PULL_MODES}, got {pull!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self.pull, self.scale, self.avg_kernel, self.dual_output = pull, float(scale), avg_kernel, dual_output
        self.train_alpha, self.alpha_relu, self.backend = train_alpha, alpha_relu, backend
        self.alpha_value = float(alpha)
        self.weight = nn.Parameter(torch.empty((out_channels, in_channels // groups, *self.kernel_size), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.bias_out = nn.Parameter(torch.empty(out_channels, **factory)) if bias_out else None
        self.alpha = nn.Parameter(torch.empty(out_channels, **factory)) if train_alpha else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As nn.Conv2d: kaiming_uniform(a=sqrt(5)) weights, uniform(+-1/sqrt(fan_in)) bias.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        fan_in = self.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        if self.bias_out is not None:
            nn.init.zeros_(self.bias_out)
        if self.alpha is not None:
            nn.init.constant_(self.alpha, self.alpha_value)

    def effective_alpha(self):
        if self.alpha is None:
            return self.alpha_value
        return torch.relu(self.alpha) if self.alpha_relu else self.alpha

    def forward(self, input: Tensor) -> Tensor:
        return push_pull_conv2d(
            input,
            self.weight,
            self.bias,
            alpha=self.effective_alpha(),
            bias_out=self.bias_out,
            padding_mode=self.padding_mode,
            backend=self.backend,
            **layer_options(self),
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += f", bias={self.bias is not None}, pull={self.pull!r}"
        if self.pull == "upsample":
            s += f", scale={self.scale}"
        alpha = "trainable" + (", relu" if self.alpha_relu else "") if self.train_alpha else self.alpha_value
        s += f", alpha={alpha}"
        if self.bias_out is not None:
            s += ", bias_out=True"
        if self.avg_kernel > 1:
            s += f", avg_kernel={self.avg_kernel}"
        if self.dual_output:
            s += ", dual_output=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    # ------------------------------------------------------------------ conversions

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, **pushpull_options) -> PushPullConv2d:
        """A push-pull layer with `conv`'s geometry and a copy of its weights (conv's bias becomes `bias`)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv2d expects an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **pushpull_options,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    @classmethod
    def from_module(cls, module: nn.Module, **overrides) -> PushPullConv2d:
        """An equivalent layer, sharing no tensors, from the papers' own modules (duck-typed):
        the 2020 `PPmodule2d` (`push`, `alpha`, `train_alpha`, `scale_factor`, `dual_output`) or the 2024
        `PushPullConv2DUnit` (`push_conv`, `avg`, `bias`, `pull_inhibition_strength`, `trainable_pull_inhibition`)."""
        if hasattr(module, "push") and hasattr(module, "scale_factor"):
            return _from_2020(cls, module, overrides)
        if hasattr(module, "push_conv") and hasattr(module, "pull_inhibition_strength"):
            return _from_2024(cls, module, overrides)
        raise TypeError(
            f"from_module does not recognise {type(module).__name__}: expected a 2020 PPmodule2d (attributes push, "
            "scale_factor, alpha) or a 2024 PushPullConv2DUnit (attributes push_conv, pull_inhibition_strength)"
        )

    # ------------------------------------------------------------------ the papers' checkpoints

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        _translate_paper_keys(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _alpha_options(alpha, trainable: bool, relu: bool) -> dict:
    if isinstance(alpha, Tensor):
        value = float(alpha.detach().flatten()[0]) if alpha.numel() else 1.0
        return {"alpha": value, "train_alpha": trainable or alpha.requires_grad, "alpha_relu": relu}
    return {"alpha": float(alpha), "train_alpha": False, "alpha_relu": relu}


def _copy_into(layer: PushPullConv2d, values: dict) -> PushPullConv2d:
    with torch.no_grad():
        for name, value in values.items():
            if value is not None and getattr(layer, name) is not None:
                getattr(layer, name).copy_(value.detach().reshape(getattr(layer, name).shape))
    return layer


def _from_2020(cls, module, overrides):
    push = module.push
    alpha = module.alpha
    options = dict(
        pull="upsample",
        scale=float(module.scale_factor),
        dual_output=bool(getattr(module, "dual_output", False)),
        **_alpha_options(alpha, bool(getattr(module, "train_alpha", False)), relu=True),
    )
    options.update(overrides)
    layer = cls.from_conv2d(push, **options)
    return _copy_into(layer, {"alpha": alpha if isinstance(alpha, Tensor) else None})


def _from_2024(cls, module, overrides):
    push = module.push_conv
    avg = getattr(module, "avg", None)
    avg_kernel = _pair(avg.kernel_size)[0] if isinstance(avg, nn.AvgPool2d) else 0
    strength = module.pull_inhibition_strength
    bias = getattr(module, "bias", None)
    options = dict(
        pull="invert",
        avg_kernel=avg_kernel,
        bias_out=bias is not None,
        **_alpha_options(strength, bool(getattr(module, "trainable_pull_inhibition", False)), relu=False),
    )
    options.update(overrides)
    layer = cls.from_conv2d(push, **options)
    return _copy_into(layer, {"alpha": strength if isinstance(strength, Tensor) else None, "bias_out": bias})


# state-dict key of a paper's layout -> our parameter name (reshaped to our shape when loading)
_PAPER_KEYS_2020 = {"push.weight": "weight", "push.bias": "bias", "alpha": "alpha"}
_PAPER_KEYS_2024 = {
    "push_conv.weight": "weight",
    "push_conv.bias": "bias",
    "bias": "bias_out",
    "pull_inhibition_strength": "alpha",
}


def _translate_paper_keys(layer: PushPullConv2d, state_dict, prefix: str) -> None:
    """Rewrites, in place, a 2020 (`push.*`) or 2024 (`push_conv.*`) layout under `prefix` into ours."""
    if prefix + "push.weight" in state_dict:
        table = _PAPER_KEYS_2020
    elif prefix + "push_conv.weight" in state_dict:
        table = _PAPER_KEYS_2024
    else:
        return
    renamed = {}
    for theirs, ours in table.items():
        if prefix + theirs in state_dict:
            renamed[ours] = state_dict.pop(prefix + theirs)
    for ours, value in renamed.items():
        target = getattr(layer, ours, None)
        if isinstance(target, Tensor) and value.numel() == target.numel():
            value = value.reshape(target.shape)
        state_dict[prefix + ours] = value
