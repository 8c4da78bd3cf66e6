"""XResNet: the ResNet of the Adjoined Networks paper (the authors' fastai-v1 network).

Three changes to torchvision's ResNet (He et al., "Bag of Tricks for Image
Classification with Convolutional Neural Networks", 2019, ResNet-C and ResNet-D):

- the 7x7 stem conv becomes three 3x3 convs of 32, 64 and 64 channels, the first with
  stride 2 (the authors' modelAdjoint.py uses fastai's course-v3 XResNet, whose stem
  widths are (c_in + 1) * 8, 64, 64);
- a shortcut that changes the shape averages 2x2 windows with stride 2 (ceil_mode) before
  its 1x1 conv, instead of a strided 1x1 conv that drops three quarters of the pixels;
- the last BatchNorm of every block starts at weight 0, so each block starts as the
  identity (fastai's zero_bn).

Convs and the classifier use fastai's init_cnn: Kaiming normal weights, zero biases.
Module names follow torchvision's ResNet (``conv1`` is the stem, ``layer1.0.conv2``,
``layer2.0.downsample``, ``fc``), so the paper's policy and per-layer tables read alike.
"""

from __future__ import annotations

from typing import Sequence, Type, Union

from torch import Tensor, nn

__all__ = ["XResNet", "BasicBlock", "Bottleneck", "xresnet18", "xresnet34", "xresnet50", "xresnet101"]


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """ResNet-D: average-pool, then a 1x1 conv and BN; nothing when the shape is kept."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    pool = [nn.AvgPool2d(2, stride=2, ceil_mode=True)] if stride != 1 else []
    return nn.Sequential(*pool, _conv(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs (XResNet-18 / 34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, out_channels, 3)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    @property
    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as torchvision's ResNet v1.5), 1x1 expand."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv(in_channels, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    @property
    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class XResNet(nn.Module):
    """XResNet with ``block`` and ``layers`` blocks per stage; see the module docstring.

    Args:
        block: BasicBlock (18 / 34) or Bottleneck (50 / 101).
        layers: blocks in each of the four stages.
        num_classes: outputs of the classifier.
        in_channels: image channels.
        stem_channels: output channels of the three stem convs.
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int],
                 num_classes: int = 1000, in_channels: int = 3,
                 stem_channels: Sequence[int] = (32, 64, 64)):
        super().__init__()
        if len(layers) != 4 or len(stem_channels) != 3:
            raise ValueError(f"XResNet: layers={list(layers)} needs 4 stages and "
                             f"stem_channels={list(stem_channels)} 3 convs")
        stem, previous = [], in_channels
        for index, channels in enumerate(stem_channels):
            stem += [_conv(previous, channels, 3, stride=2 if index == 0 else 1), nn.BatchNorm2d(channels),
                     nn.ReLU(inplace=True)]
            previous = channels
        self.conv1 = nn.Sequential(*stem)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            stage = []
            for block_index in range(blocks):
                stage.append(block(previous, planes, stride if block_index == 0 else 1))
                previous = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                nn.init.zeros_(module.last_norm.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def xresnet18(num_classes: int = 1000, **kwargs) -> XResNet:
    """XResNet-18: basic blocks (2, 2, 2, 2)."""
    return XResNet(BasicBlock, (2, 2, 2, 2), num_classes, **kwargs)


def xresnet34(num_classes: int = 1000, **kwargs) -> XResNet:
    """XResNet-34: basic blocks (3, 4, 6, 3)."""
    return XResNet(BasicBlock, (3, 4, 6, 3), num_classes, **kwargs)


def xresnet50(num_classes: int = 1000, **kwargs) -> XResNet:
    """XResNet-50, the Adjoined Networks paper's base: bottlenecks (3, 4, 6, 3)."""
    return XResNet(Bottleneck, (3, 4, 6, 3), num_classes, **kwargs)


def xresnet101(num_classes: int = 1000, **kwargs) -> XResNet:
    """XResNet-101: bottlenecks (3, 4, 23, 3)."""
    return XResNet(Bottleneck, (3, 4, 23, 3), num_classes, **kwargs)
