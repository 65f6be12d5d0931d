"""``bench``: images/s of training steps, our loop versus a plain baseline loop, measured in one process.

The baseline is the loop the reference code uses: a torchvision DataLoader over PIL images with
per-image RandomCrop/RandomHorizontalFlip/ToTensor, NCHW fp32, and a PGD attack run with the network
in train mode (as the reference's AttackPGD wrapper is called inside ``net.train()``). Ours: uint8 data
resident on the device with batched on-device augmentation, the attack in eval mode with gradients
for the input only, channels_last and bf16 autocast on CUDA. Both loops run the same model, batch size,
optimizer and PGD-10 settings; only ratios measured in the same run are reported (shared machines are
noisy). The last line is ``speedup_pgd_at_resnet20=<ratio>``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import config
from .config import AttackSettings, Experiment
from .loader import DeviceLoader, pick_device
from .losses import objective_for
from .models import build
from .quant import BinaryRelax
from .runtime import channels_last_for, use_amp
from .train import train_step

MODELS = ("resnet20", "en5resnet20")
KINDS = ("clean", "pgd_at")


class _PILDataset(Dataset):
    """CIFAR-style dataset returning PIL images through per-image transforms (the reference's pipeline)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from torchvision import transforms
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # HWC for PIL
        self.labels = labels
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                             transforms.RandomHorizontalFlip(), transforms.ToTensor()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _baseline_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, a: AttackSettings) -> torch.Tensor:
    """The reference's AttackPGD: train-mode network, summed CE, autograd.grad on the input."""
    adv = x.detach() + torch.empty_like(x).uniform_(-a.eps, a.eps)
    for _ in range(a.steps):
        adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [adv])
        adv = torch.min(torch.max(adv.detach() + a.step * grad.sign(), x - a.eps), x + a.eps).clamp(0, 1)
    return adv


def baseline_steps(model, optimizer, images, labels, batch, kind, attack, device) -> Iterator[int]:
    loader = DataLoader(_PILDataset(images, labels), batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
    while True:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            model.train()
            if kind == "pgd_at":
                x = _baseline_pgd(model, x, y, attack)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            yield y.numel()


def our_steps(model, optimizer, images, labels, batch, kind, attack, device, settings) -> Iterator[int]:
    channels_last = channels_last_for(device, settings)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = DeviceLoader(images, labels, batch, device, augment=True, shuffle=True, drop_last=True,
                          channels_last=channels_last)
    experiment = Experiment(name="bench", model="resnet20", loss="pgd_at" if kind == "pgd_at" else "natural")
    objective = objective_for(experiment, attack)
    relax = BinaryRelax(model, None)
    amp = use_amp(settings, device)
    gen = torch.Generator(device=device)
    epoch = 0
    while True:
        for x, y in loader.epoch(seed=epoch):
            train_step(model, relax, objective, optimizer, x, y, gen, amp)
            yield y.numel()
        epoch += 1


def images_per_second(steps: Iterator[int], warmup: int, timed: int, device: torch.device) -> float:
    for _ in range(warmup):
        next(steps)
    _sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(timed):
        seen += next(steps)
    _sync(device)
    return seen / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(settings: config.Settings, models: tuple[str, ...], kinds: tuple[str, ...], batch: int, warmup: int,
        timed: int, n_images: int, device: torch.device, log: Callable[[str], None] = print) -> dict:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_images, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_images)
    attack = settings.train.pgd
    results = {}
    for name in models:
        for kind in kinds:
            row = {}
            for loop in ("baseline", "ours"):
                model = build(name, seed=0).to(device)
                opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
                steps = (baseline_steps(model, opt, images, labels, batch, kind, attack, device) if loop == "baseline"
                         else our_steps(model, opt, images, labels, batch, kind, attack, device, settings))
                row[loop] = images_per_second(steps, warmup, timed, device)
            row["speedup"] = row["ours"] / row["baseline"]
            results[f"{kind}_{name}"] = row
            log(f"{kind:7s} {name:12s} baseline {row['baseline']:9.1f} img/s   ours {row['ours']:9.1f} img/s   "
                f"speedup {row['speedup']:.2f}x")
    return results


def environment(device: torch.device) -> dict:
    from .runtime import device_name
    return {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(MODELS), help="architectures to time")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="step kinds to time")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    p.add_argument("--steps", type=int, help="timed steps per measurement (default: 3 on CPU, 30 on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="also write the results here")


def main(args: argparse.Namespace) -> int:
    settings = config.load(args.params, args.overrides) if args.params.is_file() else config.from_dict({})
    for name in args.models:  # one-line error before any timing starts
        config.from_dict({"experiments": {"bench": {"model": name}}}, origin="--models")
    device = pick_device(args.device)
    timed = args.steps or (30 if device.type == "cuda" else 3)
    n_images = args.batch_size * (args.warmup + timed + 1)
    env = environment(device)
    print(f"bench on {env['device']}, torch {env['torch']}, batch {args.batch_size}, "
          f"PGD-{settings.train.pgd.steps}, {args.warmup} warm-up + {timed} timed steps")
    results = run(settings, tuple(args.models), tuple(args.kinds), args.batch_size, args.warmup, timed,
                  n_images, device)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    for key, row in results.items():
        if key != "pgd_at_resnet20":
            print(f"speedup_{key}={row['speedup']:.2f}")
    if "pgd_at_resnet20" in results:
        print(f"speedup_pgd_at_resnet20={results['pgd_at_resnet20']['speedup']:.2f}")
    return 0
