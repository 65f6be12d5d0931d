"""The device loader: augmentation is exactly crop-of-padded plus optional flip; epochs are seeded."""
from __future__ import annotations

import numpy as np
import torch

from paper_repro.loader import PAD, DeviceLoader


def images(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def is_crop_or_flipped_crop(out: torch.Tensor, original: torch.Tensor) -> bool:
    padded = torch.nn.functional.pad(original, (PAD, PAD, PAD, PAD))
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            crop = padded[:, dy:dy + 32, dx:dx + 32]
            if torch.equal(out, crop) or torch.equal(out, crop.flip(-1)):
                return True
    return False


def test_augmented_batches_are_crops_of_the_padded_image_possibly_flipped():
    x = images()
    y = np.arange(40) % 10
    loader = DeviceLoader(x, y, 16, torch.device("cpu"), augment=True, shuffle=True)
    seen = 0
    for xb, yb in loader.epoch(seed=1):
        assert xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
        for img, label in zip(xb, yb):
            matches = [i for i in range(40) if y[i] == label and is_crop_or_flipped_crop(
                (img * 255).round().to(torch.uint8), torch.as_tensor(x[i]))]
            assert matches, "augmented image is not a crop/flip of any source image of its class"
            seen += 1
    assert seen == 40 and len(loader) == 3


def test_epochs_repeat_with_the_same_seed_and_differ_otherwise():
    loader = DeviceLoader(images(), np.arange(40) % 10, 8, torch.device("cpu"), augment=True, shuffle=True)
    a = torch.cat([xb for xb, _ in loader.epoch(seed=5)])
    b = torch.cat([xb for xb, _ in loader.epoch(seed=5)])
    c = torch.cat([xb for xb, _ in loader.epoch(seed=6)])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_without_augmentation_batches_are_the_images_in_order():
    x = images(10)
    loader = DeviceLoader(x, np.arange(10), 4, torch.device("cpu"))
    got = torch.cat([xb for xb, _ in loader.epoch(seed=0)])
    assert torch.equal((got * 255).round().to(torch.uint8), torch.as_tensor(x)) and len(loader) == 3
