"""Models: pre-activation CIFAR ResNets and their noisy ensembles (EnResNets).

``build(name, num_classes=10, *, noise=True, sigma=0.1, noise_std="batch", seed=0)`` builds
``resnet{depth}`` or ``en{k}resnet{depth}``; ``names()`` lists the paper's architectures.
"""
from .enresnet import EnResNet, NoiseSource, build, names, parse_name
from .resnet import PreActResNet

__all__ = ["EnResNet", "NoiseSource", "PreActResNet", "build", "names", "parse_name"]
