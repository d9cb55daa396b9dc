"""The CIFAR ResNets of He et al. 2016 (ResNet-20/32/44/56, option-A shortcuts).

State-dict keys follow the widely used public CIFAR-10 checkpoints: ``conv1``/``bn1``,
``layer{1,2,3}.{i}.conv1/bn1/conv2/bn2`` and ``linear``; the shortcuts have no parameters.
"""

from __future__ import annotations

import torch
from torch import nn

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}  # blocks per stage


class PadShortcut(nn.Module):
    """Option A: subsample by 2 and zero-pad the channels, ``front`` new ones before the
    ``inputs`` carried and ``back`` after (equally on both sides as built). A channel map
    (``structured.groups.ChannelMapping``): the residual stream is pruned across stages."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.inputs, self.front = inputs, (outputs - inputs) // 2
        self.back = outputs - inputs - self.front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.front, self.back))

    def channel_map(self, inputs: int) -> torch.Tensor:
        carried = torch.arange(self.front + inputs + self.back) - self.front
        return carried.masked_fill((carried < 0) | (carried >= inputs), -1)

    def keep_channels(self, kept_inputs: torch.Tensor, kept_outputs: torch.Tensor) -> None:
        carried = (kept_outputs >= self.front) & (kept_outputs < self.front + self.inputs)
        if int(carried.sum()) != len(kept_inputs):
            raise ValueError("the kept channels of the shortcut's input and output disagree")
        self.front = int((kept_outputs < self.front).sum())
        self.back = len(kept_outputs) - self.front - len(kept_inputs)
        self.inputs = len(kept_inputs)


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        changes = stride != 1 or inputs != outputs
        self.shortcut = PadShortcut(inputs, outputs) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages of ``depth`` basic blocks (16/32/64 channels), pool, linear."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, width = [], 16
        for k, outputs in enumerate((16, 32, 64)):
            blocks = [
                BasicBlock(outputs if i else width, outputs, 2 if k and not i else 1)
                for i in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            width = outputs
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def cifar_resnet(arch: str, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(DEPTHS[arch], num_classes)
