"""VGG for CIFAR (the BinaryRelax reference demo's VGG-11): conv3x3-BN-ReLU stacks, max-pools, one Linear.

Why here: the BinaryRelax demo (penhunt/binaryrelax) reports VGG-11 float 92.13% vs binary BR 89.21% on
CIFAR-10 with natural training; building the same network checks our BR on its own reference result,
independently of adversarial training. Layout of the common CIFAR VGG (kuangliu/pytorch-cifar, which the
demo's code follows): 3x3 convs with bias, BatchNorm, ReLU, 2x2 max-pools, then a 512 -> classes Linear.
Every 3x3 conv is a plain ``nn.Conv2d`` so the quantizer selects it like the ResNets' convs.
"""
from __future__ import annotations

import torch
from torch import nn

CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """VGG-{11,13,16,19} for 32x32 inputs (global average pool before the Linear, as 1x1 after five pools)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth!r}")
        self.depth = depth
        layers: list[nn.Module] = []
        in_ch = 3
        for item in CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers += [nn.Conv2d(in_ch, int(item), kernel_size=(3, 3), padding=1), nn.BatchNorm2d(int(item)),
                       nn.ReLU(inplace=True)]
            in_ch = int(item)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.fc(out.mean(dim=(2, 3)))  # = flatten of the 1x1 map on 32x32 inputs


def vgg_member(depth: int) -> "callable":
    def make(num_classes: int, after_add: object) -> nn.Module:
        if after_add is not None:
            raise ValueError("VGG has no residual additions: it takes no EnResNet noise")
        return VGG(depth, num_classes)
    return make

