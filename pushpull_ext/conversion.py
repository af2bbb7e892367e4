"""`convert`: put push-pull layers into an existing model in place of its nn.Conv2d layers.

    model, replaced = pushpull_ext.convert(torchvision.models.resnet50(), where="b1", pull="upsample")

`where` picks the convolutions: a placement of the papers ("pp": the stem, i.e. the first
convolution; "b1": the stem and the convolutions of the first residual stage, torchvision's
`layer1`, as the papers' code does, where a bottleneck block contributes only its middle 3x3
convolution, as the ICLR 2021 paper does), an iterable of module names, or a predicate
(name, conv) -> bool. Each chosen convolution becomes a
`PushPullConv2d.from_conv2d` copy of it (same geometry, weights, device, dtype, train mode and
requires_grad), built with `pushpull_options` (the keyword-only arguments of PushPullConv2d).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Union

from torch import nn

from .modules import PushPullConv2d

PLACEMENTS = ("pp", "b1")
Where = Union[str, Iterable[str], Callable[[str, nn.Conv2d], bool]]


def convert(model: nn.Module, where: Where = "pp", **pushpull_options) -> tuple[nn.Module, list[str]]:
    """Replace the chosen nn.Conv2d layers of `model` (in place) by PushPullConv2d copies.

    Returns (model, the names of the replaced convolutions, in the model's order). Only layers of
    type nn.Conv2d itself are replaced, never subclasses (whose own forward would be lost). A
    convolution shared by several names becomes one push-pull layer shared by the same names.
    Raises (before changing anything) on an unknown placement or option, a name that is not a
    plain nn.Conv2d of `model`, or a placement the model has no layers for.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_options(pushpull_options)
    names = _chosen_names(model, where)
    layers = {}  # id(conv) -> its push-pull replacement, so shared convolutions stay shared
    for name in names:
        conv = model.get_submodule(name)
        if id(conv) not in layers:
            layers[id(conv)] = _push_pull_copy(conv, pushpull_options)
    for name in names:
        _set_submodule(model, name, layers[id(model.get_submodule(name))])
    return model, names


def _check_options(options: dict) -> None:
    allowed = [name for name, p in inspect.signature(PushPullConv2d).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"convert() got unknown push-pull option(s) {unknown}; the options are {allowed}")
    if options.get("dual_output"):
        raise ValueError(
            "convert() cannot use dual_output=True: it doubles the output channels, so the layer would "
            "not fit in place of the convolution"
        )


def _push_pull_copy(conv: nn.Conv2d, options: dict) -> PushPullConv2d:
    layer = PushPullConv2d.from_conv2d(conv, **options)
    layer.train(conv.training)
    layer.weight.requires_grad_(conv.weight.requires_grad)
    if conv.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    return layer


def _is_plain_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d


def _conv_names(model: nn.Module) -> list[str]:
    """Every name under which a plain nn.Conv2d is reachable, in registration order."""
    return [name for name, m in model.named_modules(remove_duplicate=False) if _is_plain_conv(m)]


def _chosen_names(model: nn.Module, where: Where) -> list[str]:
    if isinstance(where, str):
        if where not in PLACEMENTS:
            raise ValueError(
                f"where must be one of the placements {PLACEMENTS}, a predicate (name, conv) -> bool, "
                f"or an iterable of module names; got the string {where!r} (for one name use [{where!r}])"
            )
        return _stem_and_first_stage(model) if where == "b1" else [_stem(model)]
    if callable(where):
        return [name for name in _conv_names(model) if where(name, model.get_submodule(name))]
    try:
        wanted = list(where)
    except TypeError:
        raise TypeError(
            f"where must be a placement {PLACEMENTS}, a predicate or an iterable of module names; "
            f"got {type(where).__name__}"
        ) from None
    return _named_convs(model, wanted)


def _named_convs(model: nn.Module, wanted: list) -> list[str]:
    modules = dict(model.named_modules(remove_duplicate=False))
    for name in wanted:
        if not isinstance(name, str):
            raise TypeError(f"where: module names must be strings, got {name!r}")
        if name not in modules:
            raise ValueError(f"where names {name!r}, which is not a module of the model")
        if not _is_plain_conv(modules[name]):
            raise ValueError(
                f"where names {name!r}, a {type(modules[name]).__name__}, not an nn.Conv2d (only plain "
                "nn.Conv2d layers are converted: a subclass's own forward would be lost)"
            )
    chosen = set(wanted)
    return [name for name in _conv_names(model) if name in chosen]


def _stem(model: nn.Module) -> str:
    names = _conv_names(model)
    if not names:
        raise ValueError("where='pp' needs a stem convolution, but the model has no nn.Conv2d")
    return names[0]


def _is_residual_block(module: nn.Module) -> bool:
    """torchvision's BasicBlock and Bottleneck, and the usual CIFAR ResNets' blocks: nn.Conv2d children
    conv1 and conv2 (and conv3 for a bottleneck)."""
    return all(_is_plain_conv(getattr(module, c, None)) for c in ("conv1", "conv2"))


def _first_stage(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The blocks of the first residual stage (torchvision's `layer1`): the first residual block and
    its residual siblings in the same nn.Sequential, or the first block alone outside one."""
    first = next((name for name, m in model.named_modules() if name and _is_residual_block(m)), None)
    if first is None:
        raise ValueError(
            "where='b1' needs residual blocks (submodules with nn.Conv2d children conv1 and conv2, as "
            "torchvision's BasicBlock/Bottleneck) but the model has none; pass module names or a predicate"
        )
    stage_name = first.rpartition(".")[0]
    stage = model.get_submodule(stage_name)
    if not stage_name or not isinstance(stage, (nn.Sequential, nn.ModuleList)):
        return [(first, model.get_submodule(first))]
    return [(f"{stage_name}.{n}", m) for n, m in stage.named_children() if _is_residual_block(m)]


def _stem_and_first_stage(model: nn.Module) -> list[str]:
    # The papers' code (nicstrisc/Push-Pull-CNN-layer, resnet/resnetcifar.py, pp_block1) puts push-pull
    # layers in every block of layer1. A bottleneck's 1x1 convolutions only mix channels: there the
    # ICLR 2021 paper replaces the middle 3x3 (conv2) alone. Projection shortcuts (downsample) stay.
    chosen = {_stem(model)}
    for block_name, block in _first_stage(model):
        is_bottleneck = _is_plain_conv(getattr(block, "conv3", None))
        chosen |= {f"{block_name}.{c}" for c in (["conv2"] if is_bottleneck else ["conv1", "conv2"])}
    return [name for name in _conv_names(model) if name in chosen]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
