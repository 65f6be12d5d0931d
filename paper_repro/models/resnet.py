"""Pre-activation ResNet for CIFAR, depth 6n+2 (paper-spec section 2).

Layout, as in the reference: stem conv3x3 3->16 (no BN/ReLU after it), three stages of n
pre-activation blocks with 16/32/64 channels and strides 1/2/2, head BN -> ReLU -> average
pool -> Linear. A block computes a = ReLU(BN(x)); shortcut = conv1x1(a) (no BN) when the
shape changes, else x; out = conv3x3(ReLU(BN(conv3x3(a)))) + shortcut, then an optional
hook (the EnResNet noise) on out.

Every 3x3 conv (stem included) is a plain ``nn.Conv2d`` with kernel (3, 3) and every
shortcut a separate ``nn.Conv2d`` with kernel (1, 1): the quantizer selects weights by
module type and kernel size.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)
STAGE_STRIDES: tuple[int, int, int] = (1, 2, 2)
STEM_WIDTH = 16

#: Builds the module applied to each block's output after the residual addition.
ResidualHook = Callable[[], nn.Module]


def blocks_per_stage(depth: int) -> int:
    """n for depth 6n+2; raises ValueError for any other depth."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}"
        )
    return (depth - 2) // 6


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=(3, 3), stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=(1, 1), stride=stride, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation basic block; the projection shortcut acts on the pre-activated input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, after_add: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        needs_projection = stride != 1 or in_ch != out_ch
        self.shortcut = conv1x1(in_ch, out_ch, stride) if needs_projection else None
        self.after_add = after_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        h = self.conv2(F.relu(self.bn2(self.conv1(a))))
        out = h + shortcut
        return out if self.after_add is None else self.after_add(out)


class PreActResNet(nn.Module):
    """One CIFAR pre-activation ResNet; ``after_add`` builds the per-block noise hook (or None).
    ``widths`` / ``blocks`` let the WideResNet (models/wrn.py) reuse the same layout."""

    def __init__(self, depth: int, num_classes: int = 10, after_add: ResidualHook | None = None, *,
                 widths: tuple[int, int, int] = STAGE_WIDTHS, blocks: int | None = None):
        super().__init__()
        n = blocks_per_stage(depth) if blocks is None else blocks
        self.depth = depth
        self.stem = conv3x3(3, STEM_WIDTH)
        in_ch = STEM_WIDTH
        stages = []
        for width, stride in zip(widths, STAGE_STRIDES):
            blocks = []
            for b in range(n):
                hook = after_add() if after_add is not None else None
                blocks.append(PreActBlock(in_ch, width, stride if b == 0 else 1, hook))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.head_bn = nn.BatchNorm2d(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage3(self.stage2(self.stage1(self.stem(x))))
        out = F.relu(self.head_bn(out))
        # Global mean = the reference's 8x8 average pool on 32x32 inputs; also valid for smaller inputs.
        return self.fc(out.mean(dim=(2, 3)))


def init_weights(model: nn.Module) -> None:
    """Reference init: conv N(0, 2/(kh*kw*out_channels)), BN gamma 1 beta 0, Linear left at default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
