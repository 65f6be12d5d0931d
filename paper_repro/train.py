"""``train``: one experiment of params.yaml -> ``runs/<name>/``.

Adversarial training (PGD-10, the trade-off loss, TRADES or natural) with Binary-Relax / BinaryConnect
weight quantization, as in paper-spec §4-§5. Deliberate differences from the reference code, each
stated in the README: the checkpoint is selected on a seeded 5k hold-out of the training images (never
the test set), only among phase-2 (fully quantized) epochs, and the saved model is exactly Q(W).

Reproducibility: every random stream (data order, augmentation, attack start, model noise) is reseeded
at the start of each epoch from (train.seed, epoch), so ``--resume`` from an epoch checkpoint repeats
an uninterrupted run exactly on CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import atomic, checkpoint, config
from .config import Experiment, Settings
from .data import load_prepared, provenance, validation_split
from .loader import DeviceLoader, pick_device
from .runtime import (EXIT_BUDGET_REACHED, EpochBudget, RunPaths, autocast, channels_last_for, device_name,
                      positive_seconds, use_amp)
from .losses import Objective, objective_for
from .models import build
from .models.enresnet import derive_seed
from .quant import BinaryRelax
from .attacks import pgd

CHECK_FINITE_EVERY = 25  # steps between (syncing) checks that the loss is finite


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good epoch checkpoint is kept."""


class BudgetReached(RuntimeError):
    """--time-budget: stopped at an epoch boundary, state saved; the next call continues with --resume."""


# --------------------------------------------------------------------------- set-up
def fingerprint(settings: Settings, experiment: Experiment, data_md5: str | None) -> str:
    """What a resumed run must share with the run it continues."""
    blob = json.dumps({"train": config.to_dict(settings.train), "experiment": config.to_dict(experiment),
                       "data": data_md5, "val": [settings.data.val_size, settings.data.split_seed]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_at(epoch: float, settings: Settings) -> float:
    """Learning rate at a (fractional) epoch. step: the paper's piecewise constant schedule (x lr_gamma
    at each milestone). onecycle: linear warm-up from 0 to lr over the first onecycle_peak of training,
    then linear decay to 0 (the shortened-schedule choice of airbench-style CPU/GPU runs)."""
    t = settings.train
    if t.schedule == "onecycle":
        progress = min(max(epoch / t.epochs, 0.0), 1.0)
        peak = t.onecycle_peak
        return t.lr * (progress / peak if progress < peak else (1.0 - progress) / (1.0 - peak))
    return t.lr * t.lr_gamma ** sum(int(epoch) >= m for m in t.milestones)


def selection_metric(experiment: Experiment) -> str:
    """What picks the checkpoint: natural validation accuracy for natural training, robust (PGD)
    validation accuracy for adversarial training, as the reference codes do for each regime."""
    return "val_natural_acc" if experiment.loss == "natural" else "val_pgd_acc"


def warn_no_phase2(settings: Settings, experiment: Experiment) -> str | None:
    """A BR-quantized run whose schedule never reaches phase 2 deploys Q(W) of a network that never
    trained quantized; say so (the run is still allowed, and flagged in train.json and metrics)."""
    hard = settings.train.relax.hard_epoch
    if experiment.quantized and experiment.method == "BR" and hard >= settings.train.epochs:
        return (f"warning: {experiment.name}: train.relax.hard_epoch ({hard}) >= train.epochs "
                f"({settings.train.epochs}): no phase-2 (quantized) epoch; the deployed Q(W) never trained "
                f"quantized and the last epoch is used")
    return None


def make_model(experiment: Experiment, seed: int, device: torch.device, channels_last: bool) -> torch.nn.Module:
    model = build(experiment.model, noise=experiment.noise, seed=seed).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_relax(model: torch.nn.Module, experiment: Experiment, settings: Settings) -> BinaryRelax:
    r = settings.train.relax
    return BinaryRelax(model, experiment.quantizer if experiment.quantized else None, method=experiment.method,
                       eta0=r.eta0, rho=r.rho, hard_epoch=r.hard_epoch, **experiment.quantizer_options)


# --------------------------------------------------------------------------- one epoch
def train_step(model: torch.nn.Module, relax: BinaryRelax, objective: Objective, optimizer: torch.optim.Optimizer,
               x: torch.Tensor, y: torch.Tensor, generator: torch.Generator, amp: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: attack and loss run on U (relaxed or quantized weights), the gradient at U is
    applied to the float W. Returns (loss, logits) for the running statistics."""
    optimizer.zero_grad(set_to_none=True)
    with relax.relaxed():
        with autocast(amp, x.device):
            x_adv = objective.adversarial(model, x, y, generator) if objective.needs_adversarial else None
            model.train()
            loss, logits = objective.loss(model, x, y, x_adv)
        loss.backward()
    optimizer.step()
    return loss, logits


def train_epoch(model: torch.nn.Module, relax: BinaryRelax, objective: Objective, loader: DeviceLoader,
                optimizer: torch.optim.Optimizer, epoch: int, seed: int, amp: bool, quiet: bool,
                settings: Settings | None = None) -> dict[str, float]:
    """One pass over the training data; with ``settings`` the learning rate follows lr_at per step
    (a one-cycle schedule moves within the epoch; the step schedule is constant within it)."""
    device = loader.device
    attack_gen = torch.Generator(device=device)
    attack_gen.manual_seed(derive_seed(seed, "attack", epoch))
    model.seed_noise(derive_seed(seed, "noise", epoch))
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader.epoch(derive_seed(seed, "data", epoch)), total=len(loader), disable=quiet, leave=False,
               desc=f"epoch {epoch + 1}", unit="batch")
    start = time.perf_counter()
    for step, (x, y) in enumerate(bar, 1):
        if settings is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch + (step - 1) / len(loader), settings)
        loss, logits = train_step(model, relax, objective, optimizer, x, y, attack_gen, amp)
        loss_sum += loss.detach().float() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        if step % CHECK_FINITE_EVERY == 0 or step == len(loader):
            mean = loss_sum.item() / seen
            if not math.isfinite(mean):
                raise TrainingDiverged(f"non-finite loss at epoch {epoch + 1}, step {step}; the last good "
                                       f"checkpoint (end of epoch {epoch}) is kept: lower train.lr or check the data")
            bar.set_postfix(loss=f"{mean:.3f}", acc=f"{100 * correct.item() / seen:.1f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum.item() / seen, "train_acc": 100 * correct.item() / seen,
            "images_per_s": seen / elapsed, "epoch_s": elapsed}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, batch: int, amp: bool,
             attack: config.AttackSettings | None = None, seed: int = 0) -> float:
    """% correct on (x_all uint8, y_all), clean or under PGD (eval mode, model noise as configured)."""
    gen = torch.Generator(device=x_all.device)
    gen.manual_seed(seed)
    model.seed_noise(seed)
    model.eval()
    correct = 0
    for i in range(0, y_all.numel(), batch):
        x, y = x_all[i:i + batch].float().div(255), y_all[i:i + batch]
        with autocast(amp, x.device):
            if attack is not None:
                with torch.enable_grad():
                    x = pgd(model, x, y, eps=attack.eps, step=attack.step, steps=attack.steps,
                            random_start=attack.random_start, generator=gen)
            correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / max(1, y_all.numel())


def validate(model: torch.nn.Module, relax: BinaryRelax, x_val: torch.Tensor, y_val: torch.Tensor,
             settings: Settings, amp: bool) -> dict[str, float]:
    """Natural and PGD accuracy of the deployed model Q(W) on the hold-out split (selection metric)."""
    batch = max(settings.train.batch_size, 256)
    seed = derive_seed(settings.train.seed, "validation")
    with relax.deployed():
        nat = accuracy(model, x_val, y_val, batch, amp, seed=seed)
        rob = accuracy(model, x_val, y_val, batch, amp, settings.train.val_attack, seed=seed)
    return {"val_natural_acc": nat, "val_pgd_acc": rob}


# --------------------------------------------------------------------------- checkpoints
def save_state(paths: RunPaths, model: torch.nn.Module, optimizer: torch.optim.Optimizer, relax: BinaryRelax,
               record: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"optimizer.{i}.momentum_buffer"] = buf
    checkpoint.save(paths.state, tensors, {**record, "relax": relax.state_dict(), "kind": "resume-state"})


def load_state(paths: RunPaths, model: torch.nn.Module, optimizer: torch.optim.Optimizer, relax: BinaryRelax,
               device: torch.device) -> dict[str, Any]:
    tensors, record = checkpoint.load(paths.state, device=device)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        key = f"optimizer.{i}.momentum_buffer"
        if key in tensors:
            optimizer.state[p]["momentum_buffer"] = tensors[key].clone()
    relax.load_state_dict(record["relax"])
    return record


def save_selected(paths: RunPaths, model: torch.nn.Module, relax: BinaryRelax, sidecar: dict[str, Any]) -> None:
    checkpoint.save(paths.float_weights, model.state_dict(), {**sidecar, "kind": "float"})
    checkpoint.save(paths.deployed, relax.deployed_tensors(), {**sidecar, "kind": "deployed"})


def run_sidecar(settings: Settings, experiment: Experiment, model: torch.nn.Module, relax: BinaryRelax,
                data_meta: dict[str, Any], device: torch.device, split: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "arch": model.arch, "arch_config": model.arch_config, "run": experiment.name,
        "profile": settings.profile, "model": experiment.model,
        "quantizer": experiment.quantizer, "quantizer_options": experiment.quantizer_options,
        "method": experiment.method if experiment.quantized else "none",
        "quantized": list(relax.names), "loss": experiment.loss, "loss_params": experiment.resolved_loss_params(),
        "noise": experiment.noise, "train": config.to_dict(settings.train), "data": provenance(data_meta),
        "split": dict(split or {}), "selection_metric": selection_metric(experiment),
        "device": device_name(device), "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- the run
def train(settings: Settings, experiment: Experiment, run_dir: Path, *, resume: bool = False,
          quiet: bool = False, live_dir: Path | None = None, time_budget: float | None = None) -> dict[str, Any]:
    """Train ``experiment`` into ``run_dir``; per-epoch DVCLive metrics go to ``live_dir``
    (default ``dvclive/<name>``, beside runs/ so DVC can declare them as metrics and plots).
    ``time_budget`` (seconds from this call): raise BudgetReached at the first epoch boundary where the
    next epoch would not fit (see runtime.EpochBudget); None: no limit (the run is unchanged)."""
    budget = EpochBudget(time_budget) if time_budget is not None else None
    paths = RunPaths(Path(run_dir))
    live_dir = Path(live_dir) if live_dir is not None else Path("dvclive") / experiment.name
    t = settings.train
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    data = load_prepared(settings.data.prepared)
    train_idx, val_idx = validation_split(len(data.y_train), settings.data.val_size, settings.data.split_seed)
    if t.val_examples is not None:
        val_idx = val_idx[:t.val_examples]
    channels_last = channels_last_for(device, settings)
    loader = DeviceLoader(data.x_train[train_idx], data.y_train[train_idx], t.batch_size, device,
                          augment=t.augment, shuffle=True, drop_last=False, channels_last=channels_last)
    x_val = torch.as_tensor(data.x_train[val_idx]).to(device)
    y_val = torch.as_tensor(data.y_train[val_idx]).to(device)

    model = make_model(experiment, t.seed, device, channels_last)
    relax = make_relax(model, experiment, settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                                nesterov=t.nesterov)
    objective = objective_for(experiment, t.pgd)
    amp = use_amp(settings, device)
    if t.compile and device.type == "cuda":
        model.forward = torch.compile(model.forward)
    no_phase2 = warn_no_phase2(settings, experiment)
    if no_phase2:
        print(no_phase2, flush=True)
    select_on = selection_metric(experiment)

    fp = fingerprint(settings, experiment, data.meta.get("archive_md5"))
    record: dict[str, Any] = {"fingerprint": fp, "epochs_done": 0, "history": [], "best": None, "wall_s": 0.0}
    if resume and paths.state.is_file():
        previous = checkpoint.read_sidecar(paths.state)
        if previous.get("fingerprint") == fp:
            record = load_state(paths, model, optimizer, relax, device)
            print(f"resuming {experiment.name} after epoch {record['epochs_done']}")
        else:
            print(f"settings changed since the saved state of {experiment.name}: starting from scratch")
    if record["epochs_done"] == 0:
        for stale in (paths.state.parent, live_dir):
            shutil.rmtree(stale, ignore_errors=True)
    split = {"train_images": len(train_idx), "val_images": len(val_idx), "val_size": settings.data.val_size,
             "split_seed": settings.data.split_seed}
    sidecar = run_sidecar(settings, experiment, model, relax, data.meta, device, split)
    if budget is not None and record["epochs_done"]:
        budget.prior = record["wall_s"] / record["epochs_done"]
    stopped = None

    from dvclive import Live
    live_exists = (live_dir / "metrics.json").is_file()
    with Live(dir=str(live_dir), resume=record["epochs_done"] > 0 and live_exists, save_dvc_exp=False,
              dvcyaml=None) as live:
        if record["epochs_done"] == 0 or not live_exists:
            live.log_params({"run": experiment.name, "model": experiment.model, "quantizer": experiment.quantizer,
                             "method": sidecar["method"], "loss": experiment.loss, "profile": settings.profile})
            for stats in record["history"]:  # a resumed run whose log went missing: replay it
                log_epoch(live, stats)
        for epoch in range(record["epochs_done"], t.epochs):
            if budget is not None and not budget.next_epoch_fits():
                stopped = budget.stop_message(experiment.name, epoch, t.epochs, paths.state)
                break
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch, settings)
            stats = train_epoch(model, relax, objective, loader, optimizer, epoch, t.seed, amp, quiet, settings)
            stats.update(validate(model, relax, x_val, y_val, settings, amp))
            stats.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], eta=relax.eta, phase=relax.phase(epoch))
            selectable = relax.selectable(epoch)
            improved = selectable and (record["best"] is None or stats[select_on] > record["best"][select_on])
            relax.end_epoch(epoch)
            record["wall_s"] += time.perf_counter() - start
            record["history"].append(stats)
            record["epochs_done"] = epoch + 1
            if improved:
                record["best"] = {**{k: stats[k] for k in ("epoch", "val_pgd_acc", "val_natural_acc", "phase")},
                                  "metric": select_on}
                save_selected(paths, model, relax, {**sidecar, "selected": record["best"]})
            save_state(paths, model, optimizer, relax, record)
            log_epoch(live, stats)
            print(f"{experiment.name} epoch {epoch + 1}/{t.epochs} phase {stats['phase']} lr {stats['lr']:.4g} "
                  f"loss {stats['train_loss']:.3f} train {stats['train_acc']:.1f}% val nat "
                  f"{stats['val_natural_acc']:.1f}% pgd {stats['val_pgd_acc']:.1f}% "
                  f"({stats['images_per_s']:.0f} img/s){' *' if improved else ''}", flush=True)
            if budget is not None:
                budget.epoch_done()

    if stopped:
        raise BudgetReached(stopped)

    if record["best"] is None:  # e.g. hard_epoch == epochs: no fully quantized epoch to choose from
        record["best"] = {**{k: record["history"][-1][k] for k in ("epoch", "val_pgd_acc", "val_natural_acc",
                                                                 "phase")}, "metric": select_on,
                          "fallback": "last epoch: no phase-2 epoch"}
        save_selected(paths, model, relax, {**sidecar, "selected": record["best"]})
    phase2 = sum(1 for h in record["history"] if h["phase"] == 2)
    summary = {**sidecar, "selected": record["best"], "epochs": t.epochs, "history": record["history"],
               "phase2_epochs": phase2, "trained_quantized": (not experiment.quantized) or phase2 > 0,
               "wall_s": record["wall_s"], "versions": checkpoint.versions(), "fingerprint": fp}
    atomic.write_json(paths.summary, summary, indent=2, sort_keys=True)
    return summary


LIVE_KEYS = ("train_loss", "train_acc", "val_natural_acc", "val_pgd_acc", "lr", "eta", "phase")


def log_epoch(live: Any, stats: dict[str, Any]) -> None:
    for key in LIVE_KEYS:
        live.log_metric(key, stats[key])
    live.next_step()


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", required=True, help="name of an entry of params.yaml's experiments")
    p.add_argument("--run-dir", type=Path, help="output folder (default: runs/<experiment>)")
    p.add_argument("--resume", action="store_true", help="continue from runs/<experiment>/state if compatible")
    p.add_argument("--live-dir", type=Path, help="DVCLive folder (default: dvclive/<experiment>)")
    p.add_argument("--time-budget", type=positive_seconds, metavar="SECONDS",
                   help=f"stop at the first epoch boundary where the next epoch would end after SECONDS (estimated "
                        f"from the epochs done), saving the state; exit {EXIT_BUDGET_REACHED}: continue with --resume")


def main(args: argparse.Namespace) -> int:
    settings = config.load(args.params, args.overrides)
    experiment = settings.experiment(args.experiment)
    run_dir = args.run_dir or Path("runs") / experiment.name
    try:
        summary = train(settings, experiment, run_dir, resume=args.resume, quiet=args.quiet, live_dir=args.live_dir,
                        time_budget=args.time_budget)
    except BudgetReached as e:
        print(e, flush=True)
        return EXIT_BUDGET_REACHED
    except TrainingDiverged as e:
        print(f"error: {e}", flush=True)
        return 3
    except KeyboardInterrupt:
        print(f"interrupted: the last finished epoch is saved in {RunPaths(run_dir).state}; "
              f"continue with --resume", flush=True)
        return 130
    best = summary["selected"]
    print(f"{experiment.name}: selected epoch {best['epoch']} (val PGD {best['val_pgd_acc']:.2f}%, "
          f"natural {best['val_natural_acc']:.2f}%) -> {RunPaths(run_dir).deployed}")
    return 0
