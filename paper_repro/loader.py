"""Device-resident CIFAR batches with on-device augmentation.

Why: adversarial training runs ~11 forward/backward passes per image, so the input pipeline must cost
nothing. The uint8 images live on the device once; each epoch is a seeded permutation; random crop
(4-pixel zero padding) and horizontal flip are one batched gather per batch; no per-image Python.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

PAD = 4


class DeviceLoader:
    """Yields (x float in [0,1], y int64) minibatches of a uint8 (N,3,H,W) array kept on ``device``."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, batch_size: int,
                 device: torch.device, *, augment: bool = False, shuffle: bool = False, drop_last: bool = False,
                 channels_last: bool = False) -> None:
        self.images = torch.as_tensor(images).to(device)
        self.labels = torch.as_tensor(labels).to(device=device, dtype=torch.long)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N,C,H,W), got {self.images.dtype} {tuple(self.images.shape)}")
        self.batch_size, self.device = batch_size, device
        self.augment, self.shuffle, self.drop_last = augment, shuffle, drop_last
        self.channels_last = channels_last
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(0)
        if augment:
            self.padded = torch.nn.functional.pad(self.images, (PAD, PAD, PAD, PAD))  # zero padding

    def __len__(self) -> int:
        n = self.labels.numel()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass; ``seed`` fixes order and augmentation, so a resumed epoch repeats exactly."""
        self.generator.manual_seed(seed)
        n = self.labels.numel()
        order = (torch.randperm(n, device=self.device, generator=self.generator) if self.shuffle
                 else torch.arange(n, device=self.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self._augment(idx) if self.augment else self.images[idx]
            x = x.to(torch.get_default_dtype()).div_(255)  # fp32 unless a test asks for fp64
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]

    def _augment(self, idx: torch.Tensor) -> torch.Tensor:
        """Random 32x32 crop of the zero-padded image and random horizontal flip, as one gather."""
        b = idx.numel()
        _, c, h, w = self.images.shape
        g = self.generator
        dy = torch.randint(0, 2 * PAD + 1, (b, 1), device=self.device, generator=g)
        dx = torch.randint(0, 2 * PAD + 1, (b, 1), device=self.device, generator=g)
        flip = torch.rand((b, 1), device=self.device, generator=g) < 0.5
        rows = torch.arange(h, device=self.device).unsqueeze(0) + dy                      # (b, h)
        cols = torch.arange(w, device=self.device).unsqueeze(0)
        cols = torch.where(flip, (w - 1) - cols, cols) + dx                               # (b, w)
        chans = torch.arange(c, device=self.device)
        return self.padded[idx[:, None, None, None], chans[None, :, None, None], rows[:, None, :, None],
                           cols[:, None, None, :]]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (use device: auto or cpu)")
    return device
