"""Stand-ins of the papers' push-pull layers (written from the papers' formulas, README.md "The formula",
with the attribute and state-dict names of the papers' code) and small torchvision-style ResNets to put them in."""

import torch
import torch.nn.functional as F
from torch import nn


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


class BasicBlock(nn.Module):
    """torchvision's BasicBlock layout: conv1 (3x3, stride), conv2 (3x3), optional downsample."""

    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck layout (v1.5): conv1 1x1, conv2 3x3 (stride), conv3 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, maxpool, layer1..., avgpool, fc) at small widths.

    `stem`: "imagenet" (7x7 stride 2 and max pooling) or "cifar" (3x3, as the CIFAR ResNets of the
    2020 code); `stem_layer` replaces conv1 (e.g. by a paper's push-pull layer)."""

    def __init__(self, block, blocks_per_stage, widths, stem="cifar", num_classes=10, stem_layer=None):
        super().__init__()
        cifar = stem == "cifar"
        self.conv1 = stem_layer or (
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False) if cifar else nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        )
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        self.channels = widths[0]
        for i, (count, width) in enumerate(zip(blocks_per_stage, widths)):
            setattr(self, f"layer{i + 1}", self._stage(block, width, count, stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.channels, num_classes)
        self.stages = len(blocks_per_stage)

    def _stage(self, block, planes, count, stride):
        downsample = None
        if stride != 1 or self.channels != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.channels, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.channels, planes, stride, downsample)]
        self.channels = planes * block.expansion
        layers += [block(self.channels, planes) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(stem_layer=None):
    """The CIFAR ResNet-20 of the 2020 code (3 stages of 3 BasicBlocks, 16/32/64 channels)."""
    return ResNet(BasicBlock, [3, 3, 3], [16, 32, 64], stem="cifar", stem_layer=stem_layer)


def tiny_resnet(block=BasicBlock, stem="cifar"):
    """Two stages of two blocks at 4/8 channels: a whole ResNet small enough for every test."""
    return ResNet(block, [2, 2], [4, 8], stem=stem)
