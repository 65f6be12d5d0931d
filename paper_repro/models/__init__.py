"""Models: pre-activation CIFAR ResNets and their noisy ensembles (EnResNets).

``build(name, num_classes=10, *, noise=True, sigma=0.1, noise_std="batch", seed=0)`` builds
``resnet{depth}``, ``en{k}resnet{depth}``, ``wrn{depth}-{widen}``, ``en{k}wrn{depth}-{widen}`` or
``vgg{11,13,16,19}``; ``names()`` lists the architectures of the paper and its references.
"""
from .enresnet import Arch, EnResNet, NoiseSource, build, names, parse_arch, parse_name
from .flops import count_macs
from .resnet import PreActResNet

__all__ = ["Arch", "EnResNet", "NoiseSource", "PreActResNet", "build", "count_macs", "names", "parse_arch", "parse_name"]
