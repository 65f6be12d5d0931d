"""``bench``: images/s of training steps, our loop versus a plain baseline loop, measured in one process.

The baseline is the loop the reference code uses: a torchvision DataLoader over PIL images with
per-image RandomCrop/RandomHorizontalFlip/ToTensor, NCHW fp32, and a PGD attack run with the network
in train mode (as the reference's AttackPGD wrapper is called inside ``net.train()``). Ours: uint8 data
resident on the device with batched on-device augmentation, the attack in eval mode with gradients
for the input only, channels_last, bf16 autocast, train's fused SGD (learning rate on the device) and, as
``train.cudnn_benchmark`` says, cuDNN's timed choice of convolution algorithms on CUDA (the baseline keeps
PyTorch's default, heuristics; the flag is process-wide, so each loop sets it before each of its steps).
Both loops run the same model, batch size, SGD hyperparameters and PGD-10 settings; only ratios measured in the same run are reported (shared machines are
noisy). Each loop is timed ``--repeats`` times, the loops interleaved (baseline, ours, baseline, ...), so a
burst of load hits both; reported: median images/s, min/max and the spread (max-min)/median, and the
speedup as the ratio of medians with the range of the per-repeat ratios.

``--stacked K ...`` also times K ResNet20s trained as one grouped network (``paper_repro.stacked``)
against the same K trained one after another with our loop (aggregate images/s, same PGD-10 step).
``--compile MODE`` adds our loop (and the stacked network) under torch.compile; ``--cuda-graph`` adds them with
the whole step captured as one CUDA graph (``paper_repro.step_graph``, what ``train.cuda_graph`` does).
The last line is ``speedup_pgd_at_resnet20=<ratio>``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import atomic, config
from .config import AttackSettings, Experiment
from .loader import DeviceLoader, pick_device
from .losses import objective_for
from .models import build
from .quant import BinaryRelax
from .runtime import channels_last_for, compile_forward, use_amp
from .stacked import build_stacked
from .stacked_step import StackedRelax, stacked_train_step
from .step_profile import profile_steps
from .step_graph import StepGraph, step_generators
from .train import make_optimizer, train_step

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


def sgd(model: torch.nn.Module, ours: bool) -> torch.optim.SGD:
    """The timed loops' SGD (lr 0.01, momentum 0.9, weight decay 5e-4): torch's default for the baseline, train's
    (fused, lr on the device, on CUDA) for ours."""
    settings = config.from_dict({"train": {"lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False}})
    return make_optimizer(model.parameters(), settings, lr_on_device=None if ours else False)


def our_steps(model, optimizer, images, labels, batch, kind, attack, device, settings,
              compile_mode: str | None = None, graph: bool = False) -> Iterator[int]:
    """Our loop; with ``compile_mode`` the network runs through ``torch.compile`` (fused kernels, and CUDA
    graphs with "reduce-overhead"): the first steps compile, so warm-up must cover them. With ``graph`` the whole
    step is one CUDA graph after two warm-up steps (``optimizer`` from ``sgd(model, ours=True)``)."""
    channels_last = channels_last_for(device, settings)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_mode:
        model = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    loader = DeviceLoader(images, labels, batch, device, augment=True, shuffle=True, drop_last=True,
                          channels_last=channels_last)
    experiment = Experiment(name="bench", model="resnet20", loss="pgd_at" if kind == "pgd_at" else "natural")
    objective = objective_for(experiment, attack)
    relax = BinaryRelax(model, None)
    amp = use_amp(settings, device)
    gen = torch.Generator(device=device)

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return train_step(model, relax, objective, optimizer, x, y, gen, amp)

    if graph:
        step = StepGraph(step, lambda: step_generators(model, gen))
    epoch = 0
    while True:
        for x, y in loader.epoch(seed=epoch):
            step(x, y)
            yield y.numel()
        epoch += 1


def stacked_steps(name, k, images, labels, batch, attack, device, settings, stacked: bool,
                  compile_mode: str | None = None, graph: bool = False) -> Iterator[int]:
    """K models on one shared batch per step: one stacked network (under torch.compile with ``compile_mode``, or
    as one CUDA graph with ``graph``), or K of our steps one after another."""
    channels_last = channels_last_for(device, settings)
    loader = DeviceLoader(images, labels, batch, device, augment=True, shuffle=True, drop_last=True,
                          channels_last=channels_last)
    objective = objective_for(Experiment(name="bench", model=name, loss="pgd_at"), attack)
    amp = use_amp(settings, device)
    gens = [torch.Generator(device=device) for _ in range(k)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if stacked:
        net = build_stacked([name] * k, list(range(k))).to(device, memory_format=fmt)
        relax = StackedRelax(net, [BinaryRelax(build(name, seed=i), None) for i in range(k)])
        opt = sgd(net, ours=True)
        if compile_mode:
            compile_forward(net, compile_mode)

        def step(x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
            return stacked_train_step(net, relax, [objective] * k, opt, x, y, gens, amp)

        if graph:
            step = StepGraph(step, lambda: step_generators(net, *gens))
    else:
        nets = [build(name, seed=i).to(device, memory_format=fmt) for i in range(k)]
        relaxes = [BinaryRelax(m, None) for m in nets]
        opts = [sgd(m, ours=True) for m in nets]
    epoch = 0
    while True:
        for x, y in loader.epoch(seed=epoch):
            if stacked:
                step(x, y)
            else:
                for m, r, o, g in zip(nets, relaxes, opts, gens):
                    train_step(m, r, objective, o, x, y, g, amp)
            yield k * y.numel()
        epoch += 1


def images_per_second(steps: Iterator[int], timed: int, device: torch.device) -> float:
    _sync(device)
    start, seen = time.perf_counter(), 0
    for _ in range(timed):
        seen += next(steps)
    _sync(device)
    return seen / (time.perf_counter() - start)


def measure(loops: dict[str, Iterator[int]], warmup: int, timed: int, repeats: int,
            device: torch.device) -> dict[str, list[float]]:
    """images/s of each loop, ``repeats`` times, interleaved so that load changes hit every loop alike."""
    for steps in loops.values():
        for _ in range(warmup):
            next(steps)
    runs: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, steps in loops.items():
            runs[name].append(images_per_second(steps, timed, device))
    return runs


def summary(values: list[float]) -> dict[str, float | list[float]]:
    """Median, min, max and spread (max-min)/median in % of repeated measurements."""
    median = statistics.median(values)
    return {"median": round(median, 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "spread_pct": round(100 * (max(values) - min(values)) / median, 1), "runs": [round(v, 2) for v in values]}


def compare(runs: dict[str, list[float]], base: str, new: str) -> dict:
    """One result row: medians, their ratio, the range of the per-repeat ratios and every loop's statistics."""
    ratios = [b / a for a, b in zip(runs[base], runs[new])]
    return {base: summary(runs[base])["median"], new: summary(runs[new])["median"],
            "speedup": round(statistics.median(runs[new]) / statistics.median(runs[base]), 3),
            "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "stats": {name: summary(values) for name, values in runs.items()}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _line(key: str, row: dict, base: str, new: str) -> str:
    st = row["stats"]
    return (f"{key:24s} {base} {row[base]:9.1f} img/s (spread {st[base]['spread_pct']:4.1f}%)   {new} "
            f"{row[new]:9.1f} img/s (spread {st[new]['spread_pct']:4.1f}%)   speedup {row['speedup']:.2f}x "
            f"[{row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}]")


def run(settings: config.Settings, models: tuple[str, ...], kinds: tuple[str, ...], batch: int, warmup: int,
        timed: int, n_images: int, device: torch.device, log: Callable[[str], None] = print, repeats: int = 1,
        stacked: tuple[int, ...] = (), stacked_model: str = "resnet20", compile_mode: str | None = None,
        graph: bool = False, profile: int = 0) -> dict:
    """Rows of results: ``<kind>_<model>`` (ours vs baseline) and ``stacked<K>_pgd_at_<model>`` (stacked vs
    sequential), each with ``_compiled`` (``compile_mode``) and ``_graphed`` (``graph``) rows beside it, and
    ``_compiled_graphed`` (the compiled network inside the step's CUDA graph) with both unless the mode makes CUDA
    graphs of its own. With ``profile`` N, each row also gets ``profile``: N more steps of each of its loops under
    torch.profiler (``step_profile``)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_images, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n_images)
    attack = settings.train.pgd
    variants = [("compiled", {"compile_mode": compile_mode}, f" (torch.compile {compile_mode})")] if compile_mode else []
    if graph:
        variants.append(("graphed", {"graph": True}, " (whole step as one CUDA graph)"))
    if graph and compile_mode and compile_mode not in config.GRAPHING_COMPILE_MODES:
        variants.append(("compiled_graphed", {"compile_mode": compile_mode, "graph": True},
                         f" (torch.compile {compile_mode} inside one CUDA graph of the step)"))
    results = {}

    def report(key: str, label: str, runs: dict[str, list[float]], base: str, new: str) -> None:
        results[key] = compare(runs, base, new)
        log(_line(label, results[key], base, new))
        for variant, _, note in variants:
            loop = f"{new}_{variant}" if new == "stacked" else variant
            extra = results[f"{key}_{variant}"] = {**compare(runs, base, loop), "variant": variant}
            if "compiled" in variant:
                extra["compile_mode"] = compile_mode
            log(_line(label, extra, base, loop) + note)

    def profiled(key: str, loops: dict[str, Iterator[int]]) -> None:
        if not profile:
            return
        for loop, steps in loops.items():
            try:
                p = profile_steps(steps, profile, device)
            except Exception as e:  # the profiler is a diagnosis: its failure must not cost the row's timings
                results[key].setdefault("profile", {})[loop] = {"error": f"{type(e).__name__}: {e}"[:500]}
                log(f"  profile {loop:20s} failed: {type(e).__name__}: {e}")
                continue
            results[key].setdefault("profile", {})[loop] = p
            log(f"  profile {loop:20s} {p['kernels_per_step']:8.1f} {p['counted']} per step, busy "
                f"{p['busy_ms_per_step']:.2f} of {p['wall_ms_per_step']:.2f} ms ({p['busy_pct']:.0f}%)")

    for name in models:
        for kind in kinds:
            loops = {"baseline": _baseline_loop(name, images, labels, batch, kind, attack, device),
                     "ours": _our_loop(name, images, labels, batch, kind, attack, device, settings)}
            for variant, options, _ in variants:
                loops[variant] = _our_loop(name, images, labels, batch, kind, attack, device, settings, **options)
            report(f"{kind}_{name}", f"{kind} {name}", measure(loops, warmup, timed, repeats, device),
                   "baseline", "ours")
            profiled(f"{kind}_{name}", loops)
    for k in stacked:
        loops = {loop: stacked_steps(stacked_model, k, images, labels, batch, attack, device, settings,
                                     loop != "sequential") for loop in ("sequential", "stacked")}
        for variant, options, _ in variants:
            loops[f"stacked_{variant}"] = stacked_steps(stacked_model, k, images, labels, batch, attack, device,
                                                        settings, True, **options)
        loops = {loop: with_cudnn_benchmark(steps, settings.train.cudnn_benchmark) for loop, steps in loops.items()}
        report(f"stacked{k}_pgd_at_{stacked_model}", f"{k}x {stacked_model} pgd_at",
               measure(loops, warmup, timed, repeats, device), "sequential", "stacked")
        profiled(f"stacked{k}_pgd_at_{stacked_model}", loops)
    return results


def with_cudnn_benchmark(steps: Iterator[int], benchmark: bool) -> Iterator[int]:
    """``steps`` with torch.backends.cudnn.benchmark set to ``benchmark`` before each step (interleaved loops share
    the process-wide flag)."""
    while True:
        torch.backends.cudnn.benchmark = benchmark
        yield next(steps)


def _baseline_loop(name, images, labels, batch, kind, attack, device) -> Iterator[int]:
    model = build(name, seed=0).to(device)
    return with_cudnn_benchmark(baseline_steps(model, sgd(model, ours=False), images, labels, batch, kind, attack,
                                               device), False)


def _our_loop(name, images, labels, batch, kind, attack, device, settings, compile_mode: str | None = None,
              graph: bool = False) -> Iterator[int]:
    model = build(name, seed=0).to(device)
    return with_cudnn_benchmark(our_steps(model, sgd(model, ours=True), images, labels, batch, kind, attack, device,
                                          settings, compile_mode, graph), settings.train.cudnn_benchmark)


def environment(device: torch.device) -> dict:
    from .runtime import device_name
    return {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="*", default=list(MODELS), help="architectures to time (none: only --stacked)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="step kinds to time")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    p.add_argument("--steps", type=int, help="timed steps per measurement (default: 3 on CPU, 30 on CUDA)")
    p.add_argument("--repeats", type=int, help="measurements per loop, interleaved (default: 3 on CPU, 5 on CUDA)")
    p.add_argument("--stacked", type=int, nargs="*", default=[], metavar="K",
                   help="also time K stacked models against K sequential ones (PGD training step), e.g. 2 4")
    p.add_argument("--stacked-model", default="resnet20", help="architecture of the stacked comparison")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", dest="compile_mode", choices=typing.get_args(config.CompileMode)[1:],
                   help="also time our loop (and, with --stacked, the stacked network) under torch.compile in this mode "
                        "(warm-up compiles)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time our loop (and, with --stacked, the stacked network) with the whole step captured as "
                        "one CUDA graph after two warm-up steps (CUDA only; what train.cuda_graph does); with "
                        "--compile default also the compiled network inside the graph")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, run N more steps of each loop under torch.profiler: kernels per step and the "
                        "share of the step the device is busy (step_profile)")
    p.add_argument("--json", type=Path, help="also write the results here (e.g. reports/bench.json)")


def main(args: argparse.Namespace) -> int:
    settings = config.load(args.params, args.overrides) if args.params.is_file() else config.from_dict({})
    for name in [*args.models, args.stacked_model]:  # one-line error before any timing starts
        config.from_dict({"experiments": {"bench": {"model": name}}}, origin="--models")
    for value, what in ((args.batch_size, "--batch-size"), (args.steps, "--steps"), (args.repeats, "--repeats"),
                        (args.profile or None, "--profile"), *((k, "--stacked") for k in args.stacked)):
        if value is not None and value < 1:
            raise config.ConfigError(f"{what} must be >= 1, got {value}")
    device = pick_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise config.ConfigError(f"bench --cuda-graph needs a CUDA device, got {device.type}")
    timed = args.steps or (30 if device.type == "cuda" else 3)
    repeats = args.repeats or (5 if device.type == "cuda" else 3)
    n_images = args.batch_size * (args.warmup + timed * repeats + 1)
    env = environment(device)
    print(f"bench on {env['device']}, torch {env['torch']}, batch {args.batch_size}, PGD-{settings.train.pgd.steps}, "
          f"{args.warmup} warm-up + {repeats} x {timed} timed steps per loop (interleaved)")
    results = run(settings, tuple(args.models), tuple(args.kinds), args.batch_size, args.warmup, timed, n_images,
                  device, repeats=repeats, stacked=tuple(args.stacked), stacked_model=args.stacked_model,
                  compile_mode=args.compile_mode, graph=args.cuda_graph, profile=args.profile)
    if args.json:
        setup = {"batch_size": args.batch_size, "warmup": args.warmup, "timed_steps": timed, "repeats": repeats,
                 "pgd_steps": settings.train.pgd.steps, "amp": use_amp(settings, device),
                 "compile": args.compile_mode, "cuda_graph": args.cuda_graph}
        atomic.write_json(args.json, {"environment": env, "setup": setup, "results": results}, indent=2)
    for key, row in results.items():
        if key != "pgd_at_resnet20":
            print(f"speedup_{key}={row['speedup']:.2f}")
    if "pgd_at_resnet20" in results:
        print(f"speedup_pgd_at_resnet20={results['pgd_at_resnet20']['speedup']:.2f}")
    return 0
