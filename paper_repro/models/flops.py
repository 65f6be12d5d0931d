"""Multiply-accumulates of a model per image, counted on a forward pass (the GPU-hours estimate's cost
factor for WideResNet and VGG relative to ResNet20: their convs differ too much for a block count)."""
from __future__ import annotations

import torch
from torch import nn


def count_macs(model: nn.Module, size: int = 32) -> int:
    """MACs of every Conv2d and Linear for one ``size`` x ``size`` RGB image (noise and BN not counted)."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += out.numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total += module.in_features * module.out_features * (out.numel() // module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
