"""WideResNet-d-k as in TRADES and the EnResNet poster (WRN-34-10): pre-activation, widen factor k.

Why a subclass of PreActResNet: the TRADES block (BN-ReLU first, 1x1 projection on the pre-activated input
when the shape changes, identity otherwise, no dropout) is exactly our PreActBlock, so the only differences
are the widths (16, 16k, 32k, 64k), (d-4)/6 blocks per stage and TRADES's zero Linear bias. The EnResNet
noise hook therefore lands after every residual addition here too. Some copies of the TRADES definition
also build a ``sub_block1`` that forward never runs; it is left out: 46,160,474 parameters (WRN-34-10, 10
classes) is the count of the layers that run (tests/test_wrn_vgg.py builds the reference and compares).
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet import STAGE_WIDTHS, PreActResNet, ResidualHook


def wrn_blocks_per_stage(depth: int) -> int:
    """n for WRN depth 6n+4 (34 -> 5); raises ValueError otherwise."""
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth!r}")
    return (depth - 4) // 6


class WideResNet(PreActResNet):
    """One WRN-depth-widen member; ``after_add`` builds the per-block noise hook (or None)."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, after_add: ResidualHook | None = None):
        if not isinstance(widen, int) or widen < 1:
            raise ValueError(f"WideResNet widen factor must be an int >= 1, got {widen!r}")
        widths = tuple(w * widen for w in STAGE_WIDTHS)
        super().__init__(depth, num_classes, after_add, widths=widths, blocks=wrn_blocks_per_stage(depth))
        self.widen = widen
        with torch.no_grad():
            self.fc.bias.zero_()  # TRADES: Linear bias initialised to 0


def wrn_member(depth: int, widen: int) -> "callable":
    """Member factory for EnResNet: (num_classes, hook) -> WideResNet."""
    def make(num_classes: int, after_add: ResidualHook | None) -> nn.Module:
        return WideResNet(depth, widen, num_classes, after_add)
    return make
