"""Stand-ins of the papers' push-pull layers (written from the papers' formulas, README.md "The formula",
with the attribute and state-dict names of the papers' code); the torchvision-layout ResNets to put them in
live in pushpull_ext/resnets.py (re-exported here), plus a tiny one for the tests."""

import torch
import torch.nn.functional as F
from torch import nn

from pushpull_ext.resnets import BasicBlock, Bottleneck, ResNet, resnet20  # noqa: F401  (the tests import them here)


class PPmodule2d(nn.Module):
    """Stand-in for the 2020 layer, written from the paper's formula (attributes as in the paper's code)."""

    def __init__(
        self, cin, cout, k, stride=1, padding=0, alpha=1.0, scale=2, dual_output=False, train_alpha=False, bias=True
    ):
        super().__init__()
        self.push = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
        self.scale_factor, self.dual_output, self.train_alpha = scale, dual_output, train_alpha
        self.alpha = nn.Parameter(alpha * torch.ones(1, cout, 1, 1)) if train_alpha else alpha

    def forward(self, x):
        k = self.push.weight
        size = [int(s * self.scale_factor) + (1 - int(s * self.scale_factor) % 2) for s in k.shape[2:]]
        pull = -F.interpolate(k, size=size, mode="bilinear", align_corners=True)
        pad = [
            size[0] // 2 - k.shape[2] // 2 + self.push.padding[0],
            size[1] // 2 - k.shape[3] // 2 + self.push.padding[1],
        ]
        p = self.push(x)
        q = F.conv2d(x, pull, None if self.push.bias is None else -self.push.bias, self.push.stride, pad)
        if self.dual_output:
            return torch.cat([F.relu(p), F.relu(q)], 1)
        alpha = F.relu(self.alpha) if self.train_alpha else self.alpha
        return F.relu(p) - alpha * F.relu(q)


class PushPullConv2DUnit(nn.Module):
    """Stand-in for the 2024 layer, written from the paper's formula."""

    def __init__(
        self,
        cin,
        cout,
        k,
        avg_kernel_size=3,
        stride=1,
        padding=0,
        pull_inhibition_strength=1.0,
        trainable_pull_inhibition=False,
        bias=True,
    ):
        super().__init__()
        self.push_conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
        self.avg = (
            nn.AvgPool2d(avg_kernel_size, 1, (avg_kernel_size - 1) // 2, count_include_pad=False)
            if avg_kernel_size > 1
            else None
        )
        self.bias = nn.Parameter(0.1 * torch.randn(cout)) if bias else None
        self.trainable_pull_inhibition = trainable_pull_inhibition
        self.pull_inhibition_strength = (
            nn.Parameter(pull_inhibition_strength * torch.ones(cout))
            if trainable_pull_inhibition
            else pull_inhibition_strength
        )

    def forward(self, x):
        k = self.push_conv.weight
        pull = -k + (k.amax((1, 2, 3), keepdim=True) + k.amin((1, 2, 3), keepdim=True))
        p = F.relu(self.push_conv(x))
        q = F.conv2d(x, pull, None, self.push_conv.stride, self.push_conv.padding)
        q = F.relu(self.avg(q) if self.avg is not None else q)
        strength = self.pull_inhibition_strength
        strength = strength.view(1, -1, 1, 1) if isinstance(strength, torch.Tensor) else strength
        out = p - strength * q
        return out + self.bias.view(1, -1, 1, 1) if self.bias is not None else out


def tiny_resnet(block=BasicBlock, stem="cifar"):
    """Two stages of two blocks at 4/8 channels: a whole ResNet small enough for every test."""
    return ResNet(block, [2, 2], [4, 8], stem=stem)
