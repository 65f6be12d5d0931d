"""``train``: one experiment of params.yaml -> ``runs/<name>/``.

Adversarial training (PGD-10, the trade-off loss, TRADES or natural) with Binary-Relax / BinaryConnect
weight quantization, as in paper-spec §4-§5. Deliberate differences from the reference code, each
stated in the README: the checkpoint is selected on a seeded 5k hold-out of the training images (never
the test set), only among phase-2 (fully quantized) epochs, and the saved model is exactly Q(W).

Reproducibility: every random stream (data order, augmentation, attack start, model noise) is reseeded
at the start of each epoch from (train.seed, epoch), so ``--resume`` from an epoch checkpoint repeats
an uninterrupted run exactly on CPU.

Kept whole (~440 lines): the loop reads as one sequence, set-up -> epochs -> finish, and its per-epoch pieces
(``training_data``, ``close_epoch``, ``finish_run``, ``open_live``) are what ``train_stacked`` reuses, so that a
stacked run's folder is this module's.

Crash safety (issue 17; the rules live in run_state.py): one training at a time owns the run folder (runtime.RunLock); the folder is
marked INCOMPLETE until train.json is written, and a fresh start removes the previous run's files
first; every checkpoint is written as a weights/sidecar unit that ``checkpoint.recover`` completes or
drops after a crash; no non-finite parameter or buffer is ever saved or selected; the DVCLive log is
rebuilt from the saved history on every call, so it always matches the state on disk. The test-only
hook ``runtime.fault`` (environment variable PAPER_REPRO_FAULT, points in FAULT_POINTS) kills the
process at chosen points for tests/test_faults.py; unset, it does nothing.
"""
from __future__ import annotations

import argparse
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import atomic, checkpoint, config
from .config import Experiment, Settings
from .data import load_prepared, provenance, validation_split
from .loader import DeviceLoader, pick_device
from .runtime import (EXIT_BUDGET_REACHED, EpochBudget, RunLock, RunPaths, autocast, channels_last_for, compile_forward,
                      cuda_graph_note, device_name, fault, positive_seconds, set_cudnn_benchmark, use_amp,
                      use_cuda_graph)
from .losses import Objective, objective_for
from .models import build
from .models.enresnet import derive_seed
from .quant import BinaryRelax
from .run_state import (ResumeError, SettingsChanged, TrainingDiverged, execution, last_good,  # noqa: F401 - the
                        non_finite, open_record, save_selected, save_state, state_tensors)  # errors train raises
from .attacks import pgd
from .step_graph import StepGraph, step_generators

CHECK_FINITE_EVERY = 25  # steps between (syncing) checks that the loss is finite


class BudgetReached(RuntimeError):
    """--time-budget: stopped at an epoch boundary, state saved; the next call continues with --resume."""


#: The points where ``runtime.fault`` can kill a training (PAPER_REPRO_FAULT=POINT:EPOCH, tests only):
#: ``epoch-start``; for each checkpoint (``float``, ``deployed``: the selected model; ``state``: the resume
#: state) ``-weights-tmp`` (weights in a temp file), ``-staged`` (pending weights written), ``-committed``
#: (pending sidecar written), ``-weights`` (weights renamed into place, sidecar not yet); ``after-state``
#: (state saved, DVCLive not yet), ``after-log``; ``summary`` (every epoch done, train.json not yet).
FAULT_POINTS = ("epoch-start", *(f"{c}-{s}" for c in ("float", "deployed", "state")
                                 for s in ("weights-tmp", "staged", "committed", "weights")),
                "after-state", "after-log", "summary")


# --------------------------------------------------------------------------- set-up


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


def make_model(experiment: Experiment, seed: int, device: torch.device, channels_last: bool,
               num_classes: int = 10) -> torch.nn.Module:
    model = build(experiment.model, num_classes, noise=experiment.noise, seed=seed).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_optimizer(parameters: Any, settings: Settings, lr_on_device: bool | None = None) -> torch.optim.SGD:
    """The recipe's SGD. ``lr_on_device`` (default: on CUDA): fused SGD that reads its learning rate from an fp32
    tensor on the parameters' device, so a replayed CUDA graph of the step follows the schedule (``set_lr``), and
    an eager step is the same arithmetic as a graphed one (train.cuda_graph only changes how steps launch).
    On the CPU the default stays torch's foreach SGD with a float learning rate."""
    t = settings.train
    params = list(parameters)
    if lr_on_device is None:
        lr_on_device = params[0].device.type == "cuda"
    lr: float | torch.Tensor = t.lr
    if lr_on_device:
        lr = torch.tensor(t.lr, device=params[0].device, dtype=torch.float32)  # the fused kernel reads an fp32 lr
    return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov,
                           fused=True if lr_on_device else None)


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """The learning rate of every group; a tensor one is filled in place (a CUDA graph holds that tensor)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
            group["scheduled_lr"] = value  # the exact value (the tensor holds it in fp32), read without a sync
        else:
            group["lr"] = value


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate last set, as the schedule gave it."""
    group = optimizer.param_groups[0]
    return float(group.get("scheduled_lr", group["lr"]))


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
    # detached, so the step's autograd graph dies with it: a CUDA graph captured next then meets no AccumulateGrad
    # node of an earlier step made on another stream (PyTorch warned of a sync on the H200, 2026-11-28)
    return loss.detach(), logits.detach()


def train_epoch(model: torch.nn.Module, relax: BinaryRelax, objective: Objective, loader: DeviceLoader,
                optimizer: torch.optim.Optimizer, epoch: int, seed: int, amp: bool, quiet: bool,
                settings: Settings | None = None, graph: bool = False) -> dict[str, float]:
    """One pass over the training data; with ``settings`` the learning rate follows lr_at per step
    (a one-cycle schedule moves within the epoch; the step schedule is constant within it). ``graph``: the
    step is captured as one CUDA graph after warm-up and replayed (its learning rate must live on the device:
    ``make_optimizer``'s default on CUDA)."""
    device = loader.device
    attack_gen = torch.Generator(device=device)
    attack_gen.manual_seed(derive_seed(seed, "attack", epoch))
    model.seed_noise(derive_seed(seed, "noise", epoch))

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return train_step(model, relax, objective, optimizer, x, y, attack_gen, amp)

    graphed = StepGraph(step, lambda: step_generators(model, attack_gen), fall_back=True) if graph else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader.epoch(derive_seed(seed, "data", epoch)), total=len(loader), disable=quiet, leave=False,
               desc=f"epoch {epoch + 1}", unit="batch")
    start = time.perf_counter()
    for batch_no, (x, y) in enumerate(bar, 1):
        if settings is not None:
            set_lr(optimizer, lr_at(epoch + (batch_no - 1) / len(loader), settings))
        loss, logits = (graphed or step)(x, y)
        loss_sum += loss.detach().float() * y.numel()
        correct += (logits.detach().argmax(1) == y).sum()
        seen += y.numel()
        if batch_no % CHECK_FINITE_EVERY == 0 or batch_no == len(loader):
            mean = loss_sum.item() / seen
            if not math.isfinite(mean):
                raise TrainingDiverged(f"non-finite loss at epoch {epoch + 1}, step {batch_no}")
            bar.set_postfix(loss=f"{mean:.3f}", acc=f"{100 * correct.item() / seen:.1f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum.item() / seen, "train_acc": 100 * correct.item() / seen,
            "images_per_s": seen / elapsed, "epoch_s": elapsed, **graph_counts(graphed)}


def graph_counts(graphed: StepGraph | None) -> dict[str, Any]:
    """What an epoch's history says about its CUDA graph (train.cuda_graph): steps replayed, and a failed capture."""
    if graphed is None:
        return {}
    return {"graph_replays": graphed.replays, **({"graph_failure": graphed.failure} if graphed.failure else {})}


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
        x, y = x_all[i:i + batch].to(torch.get_default_dtype()).div(255), y_all[i:i + batch]
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


# --------------------------------------------------------------------------- the run folder


def run_sidecar(settings: Settings, experiment: Experiment, model: torch.nn.Module, relax: BinaryRelax,
                data_meta: dict[str, Any], device: torch.device, split: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "arch": model.arch, "arch_config": model.arch_config, "run": experiment.name,
        "profile": settings.profile, "model": experiment.model,
        "quantizer": experiment.quantizer, "quantizer_options": experiment.quantizer_options,
        "method": experiment.method if experiment.quantized else "none",
        "quantized": list(relax.names), "loss": experiment.loss, "loss_params": experiment.resolved_loss_params(),
        "noise": experiment.noise, "train": config.to_dict(settings.train),
        "amp_in_effect": use_amp(settings, device),  # train.amp as resolved on this device ("auto": bf16 on CUDA)
        "data": provenance(data_meta),
        "split": dict(split or {}), "selection_metric": selection_metric(experiment),
        "device": device_name(device), "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- the run
def train(settings: Settings, experiment: Experiment, run_dir: Path, *, resume: bool = False, restart: bool = False,
          quiet: bool = False, live_dir: Path | None = None, time_budget: float | None = None) -> dict[str, Any]:
    """Train ``experiment`` into ``run_dir``; per-epoch DVCLive metrics go to ``live_dir``
    (default ``dvclive/<name>``, beside runs/ so DVC can declare them as metrics and plots).
    ``time_budget`` (seconds from this call): raise BudgetReached at the first epoch boundary where the
    next epoch would not fit (see runtime.EpochBudget); None: no limit (the run is unchanged).

    ``resume``: continue the saved state if its ``trajectory`` equals this call's; if it differs, raise
    SettingsChanged naming the differences, unless ``restart`` (then discard the state and start
    again). Without ``resume`` the run starts from scratch (discarding what the folder held, and saying
    so). Raises runtime.RunLocked while another process trains the same folder."""
    budget = EpochBudget(time_budget) if time_budget is not None else None
    paths = RunPaths(Path(run_dir))
    live_dir = Path(live_dir) if live_dir is not None else Path("dvclive") / experiment.name
    t = settings.train
    device = pick_device(t.device)
    set_cudnn_benchmark(settings, device)
    torch.manual_seed(t.seed)
    data = training_data(settings, experiment.dataset, device)
    channels_last = channels_last_for(device, settings)

    model = make_model(experiment, t.seed, device, channels_last, data.num_classes)
    relax = make_relax(model, experiment, settings)
    optimizer = make_optimizer(model.parameters(), settings)
    objective = objective_for(experiment, t.pgd)
    amp = use_amp(settings, device)
    if t.compile != "none":  # the module keeps its state-dict keys; attack, training and validation run compiled
        compile_forward(model, t.compile)
    for note in (warn_no_phase2(settings, experiment), cuda_graph_note(settings, device)):
        if note:
            print(note, flush=True)

    md5 = data.meta.get("archive_md5")
    exec_now = execution(settings, device)
    lock = RunLock(paths.lock).acquire()
    try:
        record = open_record(paths, experiment, settings, lock, md5, amp, exec_now, model, optimizer, relax, device,
                             resume=resume, restart=restart)
        return run_epochs(settings, experiment, paths, live_dir, record, model, relax, objective, optimizer,
                          data.loader, data.x_val, data.y_val, amp, quiet, budget, data.meta, device, data.split)
    finally:
        lock.release()


@dataclass(frozen=True)
class TrainingData:
    """The shuffled training loader and the seeded hold-out (validation) images of one dataset, on the device."""
    loader: DeviceLoader
    x_val: torch.Tensor
    y_val: torch.Tensor
    meta: dict[str, Any]
    num_classes: int
    split: dict[str, int]


def training_data(settings: Settings, dataset: str | None, device: torch.device) -> TrainingData:
    t = settings.train
    data = load_prepared(settings.data.prepared, dataset)
    train_idx, val_idx = validation_split(len(data.y_train), settings.data.val_size, settings.data.split_seed)
    if t.val_examples is not None:
        val_idx = val_idx[:t.val_examples]
    loader = DeviceLoader(data.x_train[train_idx], data.y_train[train_idx], t.batch_size, device,
                          augment=t.augment, shuffle=True, drop_last=False,
                          channels_last=channels_last_for(device, settings))
    return TrainingData(loader, torch.as_tensor(data.x_train[val_idx]).to(device),
                        torch.as_tensor(data.y_train[val_idx]).to(device), data.meta, data.num_classes,
                        {"train_images": len(train_idx), "val_images": len(val_idx),
                         "val_size": settings.data.val_size, "split_seed": settings.data.split_seed})


def run_epochs(settings: Settings, experiment: Experiment, paths: RunPaths, live_dir: Path, record: dict[str, Any],
               model: torch.nn.Module, relax: BinaryRelax, objective: Objective, optimizer: torch.optim.Optimizer,
               loader: DeviceLoader, x_val: torch.Tensor, y_val: torch.Tensor, amp: bool, quiet: bool,
               budget: EpochBudget | None, data_meta: dict[str, Any], device: torch.device,
               split: dict[str, int]) -> dict[str, Any]:
    """The epochs still to do, then train.json; called with the run lock held."""
    t = settings.train
    sidecar = run_sidecar(settings, experiment, model, relax, data_meta, device, split)
    if budget is not None and record["epochs_done"]:
        budget.prior = record["wall_s"] / record["epochs_done"]
    stopped = None
    with open_live(live_dir, experiment, settings, sidecar, record) as live:
        for epoch in range(record["epochs_done"], t.epochs):
            if budget is not None and not budget.next_epoch_fits():
                stopped = budget.stop_message(experiment.name, epoch, t.epochs, paths.state)
                break
            fault("epoch-start", epoch + 1)
            start = time.perf_counter()
            set_lr(optimizer, lr_at(epoch, settings))
            try:
                stats = train_epoch(model, relax, objective, loader, optimizer, epoch, t.seed, amp, quiet, settings,
                                    graph=use_cuda_graph(settings, device))
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}; {last_good(paths, record)}") from None
            close_epoch(settings, experiment, paths, live, record, sidecar, model, relax, optimizer, stats, epoch,
                        x_val, y_val, amp, start)
            if budget is not None:
                budget.epoch_done()

    if stopped:
        raise BudgetReached(stopped)
    return finish_run(settings, experiment, paths, record, sidecar, model, relax)


def close_epoch(settings: Settings, experiment: Experiment, paths: RunPaths, live: Any, record: dict[str, Any],
                sidecar: dict[str, Any], model: torch.nn.Module, relax: BinaryRelax, optimizer: torch.optim.Optimizer,
                stats: dict[str, Any], epoch: int, x_val: torch.Tensor, y_val: torch.Tensor, amp: bool,
                start: float) -> None:
    """After an epoch's steps: refuse non-finite weights, validate Q(W), select, save the state (and the selected
    model), log the epoch; ``start`` is the epoch's perf_counter start (its wall time includes all this)."""
    select_on = selection_metric(experiment)
    bad = non_finite(state_tensors(model, optimizer))
    if bad:
        raise TrainingDiverged(f"non-finite {', '.join(bad[:3])}{'...' if len(bad) > 3 else ''} after epoch "
                               f"{epoch + 1} (the loss stayed finite); {last_good(paths, record)}")
    stats.update(validate(model, relax, x_val, y_val, settings, amp))
    stats.update(epoch=epoch + 1, lr=current_lr(optimizer), eta=relax.eta, phase=relax.phase(epoch))
    selectable = relax.selectable(epoch)
    improved = selectable and (record["best"] is None or stats[select_on] > record["best"][select_on])
    relax.end_epoch(epoch)
    record["wall_s"] += time.perf_counter() - start
    record["history"].append(stats)
    record["epochs_done"] = epoch + 1
    if improved:
        record["best"] = {**{k: stats[k] for k in ("epoch", "val_pgd_acc", "val_natural_acc", "phase")},
                          "metric": select_on}
        save_selected(paths, model, relax, {**sidecar, "selected": record["best"]}, epoch + 1)
    save_state(paths, model, optimizer, relax, record, epoch + 1)
    fault("after-state", epoch + 1)
    log_epoch(live, stats)
    fault("after-log", epoch + 1)
    print(f"{experiment.name} epoch {epoch + 1}/{settings.train.epochs} phase {stats['phase']} lr {stats['lr']:.4g} "
          f"loss {stats['train_loss']:.3f} train {stats['train_acc']:.1f}% val nat "
          f"{stats['val_natural_acc']:.1f}% pgd {stats['val_pgd_acc']:.1f}% "
          f"({stats['images_per_s']:.0f} img/s){' *' if improved else ''}", flush=True)


def finish_run(settings: Settings, experiment: Experiment, paths: RunPaths, record: dict[str, Any],
               sidecar: dict[str, Any], model: torch.nn.Module, relax: BinaryRelax,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every epoch done: the selected model (the last epoch when no phase-2 epoch could be chosen), then train.json
    (plus ``extra``), then the folder is no longer INCOMPLETE."""
    select_on = selection_metric(experiment)
    if record["best"] is None:  # e.g. hard_epoch == epochs: no fully quantized epoch to choose from
        record["best"] = {**{k: record["history"][-1][k] for k in ("epoch", "val_pgd_acc", "val_natural_acc",
                                                                 "phase")}, "metric": select_on,
                          "fallback": "last epoch: no phase-2 epoch"}
        save_selected(paths, model, relax, {**sidecar, "selected": record["best"]}, record["epochs_done"])
    fault("summary", record["epochs_done"])
    phase2 = sum(1 for h in record["history"] if h["phase"] == 2)
    summary = {**sidecar, "selected": record["best"], "epochs": settings.train.epochs, "history": record["history"],
               "phase2_epochs": phase2, "trained_quantized": (not experiment.quantized) or phase2 > 0,
               "wall_s": record["wall_s"], "versions": checkpoint.versions(), "fingerprint": record["fingerprint"],
               **(extra or {})}
    atomic.write_json(paths.summary, summary, indent=2, sort_keys=True)
    paths.incomplete.unlink(missing_ok=True)  # the folder now holds one finished run
    return summary


def open_live(live_dir: Path, experiment: Experiment, settings: Settings, sidecar: dict[str, Any],
              record: dict[str, Any]) -> Any:
    """The DVCLive log, derived from the saved history: rebuilt on every call, so its steps continue after a
    resume, it never holds an epoch the state does not (a kill between the two) and no partial file of a killed
    call survives."""
    from dvclive import Live
    shutil.rmtree(live_dir, ignore_errors=True)
    live = Live(dir=str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None)
    live.log_params({"run": experiment.name, "model": experiment.model, "quantizer": experiment.quantizer,
                     "method": sidecar["method"], "loss": experiment.loss, "profile": settings.profile})
    for stats in record["history"]:
        log_epoch(live, stats)
    return live


LIVE_KEYS = ("train_loss", "train_acc", "val_natural_acc", "val_pgd_acc", "lr", "eta", "phase")


def log_epoch(live: Any, stats: dict[str, Any]) -> None:
    for key in LIVE_KEYS:
        live.log_metric(key, stats[key])
    live.next_step()


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", required=True, help="name of an entry of params.yaml's experiments")
    p.add_argument("--run-dir", type=Path, help="output folder (default: runs/<experiment>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from runs/<experiment>/state; if settings that change the training differ from the "
                        "saved state's, stop (exit 2) naming them. Device, amp on CPU, channels_last and compile may "
                        "differ; train.epochs may grow (step schedule: milestones are absolute epochs)")
    p.add_argument("--restart", action="store_true",
                   help="with --resume: when the saved state cannot be continued (settings that change the training "
                        "differ, unreadable or non-finite state), discard it and start again instead of stopping "
                        "(without --resume a training always starts from scratch)")
    p.add_argument("--live-dir", type=Path, help="DVCLive folder (default: dvclive/<experiment>)")
    p.add_argument("--time-budget", type=positive_seconds, metavar="SECONDS",
                   help=f"stop at the first epoch boundary where the next epoch would end after SECONDS (estimated "
                        f"from the epochs done), saving the state; exit {EXIT_BUDGET_REACHED}: continue with --resume")


def main(args: argparse.Namespace) -> int:
    settings = config.load(args.params, args.overrides)
    experiment = settings.experiment(args.experiment)
    run_dir = args.run_dir or Path("runs") / experiment.name
    return run_and_report(lambda: [train(settings, experiment, run_dir, resume=args.resume, restart=args.restart,
                                         quiet=args.quiet, live_dir=args.live_dir, time_budget=args.time_budget)],
                          [run_dir], f"the last finished epoch is saved in {RunPaths(run_dir).state}")


def run_and_report(call: Callable[[], list[dict[str, Any]]], run_dirs: list[Path], saved: str) -> int:
    """A training command's exit code (EXIT_BUDGET_REACHED, 3 diverged, 130 interrupted, 0) and its lines: one per
    finished run, or what stopped it (``saved`` says where the last finished epoch is)."""
    try:
        summaries = call()
    except BudgetReached as e:
        print(e, flush=True)
        return EXIT_BUDGET_REACHED
    except TrainingDiverged as e:
        print(f"error: {e}", flush=True)
        return 3
    except KeyboardInterrupt:
        print(f"interrupted: {saved}; continue with --resume", flush=True)
        return 130
    for run_dir, summary in zip(run_dirs, summaries):
        best = summary["selected"]
        print(f"{summary['run']}: selected epoch {best['epoch']} (val PGD {best['val_pgd_acc']:.2f}%, "
              f"natural {best['val_natural_acc']:.2f}%) -> {RunPaths(run_dir).deployed}")
    return 0
