"""Plain ResNets in torchvision's layout (module names conv1, bn1, layer1..., fc), so that
`pushpull_ext.convert` and the papers' state dicts find their layers as in torchvision's models:
ResNet-20 of the CIFAR code of the 2020 paper and ResNet-50, built without torchvision.
The whole-network benchmark (`python -m pushpull_ext.bench --models`) and the tests use them."""

import torch
from torch import nn


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


def resnet50(num_classes=1000):
    """torchvision's ResNet-50 layout (v1.5: Bottlenecks [3, 4, 6, 3] at 64/128/256/512, stride on the 3x3;
    7x7 stride-2 stem and max pooling), for when torchvision is not installed."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], stem="imagenet", num_classes=num_classes)
