"""``train-stacked``: K experiments that share a data pass, trained as ONE stacked network (issue 14), each into
its own ``runs/<name>/`` and ``dvclive/<name>/`` as ``train`` writes them.

Why: on a GPU a ResNet20 PGD-10 step is launch-bound, and K ResNet20s stacked as one grouped network run 4.15x
(K = 8) the aggregate images/s of K trainings one after another (bench, one H200). The step is
``stacked_step.stacked_train_step`` (each model gets the gradient it would get alone, one SGD holds every weight:
momentum and weight decay are elementwise). Everything else stays per run and is ``train``'s own code: the
validation of Q(W), the checkpoint selection, the finite-only checkpoints, the resume state (the member's weights and
momentum, unstacked after every epoch), the run lock, the INCOMPLETE marker, the DVCLive log and train.json, which
names the runs it was stacked with. So a stacked run is a ``train`` run within float tolerance
(tests/test_train_stacked.py), its state resumes with plain ``train --resume`` and vice versa, and ``grid --stack K``
can ``dvc commit`` its folders as the train stages' outputs.

Which runs stack: paper_repro/stacking.py.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import config
from .config import Experiment, Settings
from .loader import DeviceLoader, pick_device
from .losses import Objective, objective_for
from .models.enresnet import derive_seed
from .run_state import ResumeError, TrainingDiverged, execution, last_good, momentum_like, open_record
from .runtime import (EXIT_BUDGET_REACHED, EpochBudget, RunLock, RunPaths, channels_last_for, compile_forward,
                      cuda_graph_note, positive_seconds, set_cudnn_benchmark, use_amp,
                      use_cuda_graph)
from .stacked import StackedEnResNet, stack_models, stack_state_dicts, unstack_state_dict
from .stacked_step import StackedRelax, check_objectives, stacked_train_step
from .stacking import check_stackable
from .step_graph import StepGraph, step_generators
from .train import (CHECK_FINITE_EVERY, BudgetReached, close_epoch, current_lr, finish_run, graph_counts, lr_at,
                    make_model, make_optimizer, make_relax, open_live, run_and_report, run_sidecar, set_lr,
                    training_data, warn_no_phase2)


# --------------------------------------------------------------------------- weights and momentum, both ways
def momentum_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {name: optimizer.state[p]["momentum_buffer"] for name, p in model.named_parameters()
            if "momentum_buffer" in optimizer.state.get(p, {})}


def stack_into(net: StackedEnResNet, optimizer: torch.optim.Optimizer, models: Sequence[torch.nn.Module],
               optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """The members' momentum into the stacked optimizer (after a resume; a fresh run has none yet)."""
    buffers = [momentum_by_name(m, o) for m, o in zip(models, optimizers)]
    if not any(buffers):
        return
    stacked = stack_state_dicts(buffers)
    for name, p in net.named_parameters():
        optimizer.state[p]["momentum_buffer"] = momentum_like(p, stacked[name])


def unstack_into(net: StackedEnResNet, optimizer: torch.optim.Optimizer, models: Sequence[torch.nn.Module],
                 optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """The stacked weights, batch-norm statistics and momentum back into each member model and its optimizer."""
    with torch.no_grad():
        for model, state in zip(models, unstack_state_dict(net.state_dict(), net.member_counts)):
            own = model.state_dict()
            for key, value in state.items():
                own[key].copy_(value)
        momenta = unstack_state_dict(momentum_by_name(net, optimizer), net.member_counts)
        for model, opt, momentum in zip(models, optimizers, momenta):
            for name, p in model.named_parameters():
                if name in momentum:
                    opt.state[p]["momentum_buffer"] = momentum_like(p, momentum[name])


# --------------------------------------------------------------------------- one epoch
def stacked_epoch(net: StackedEnResNet, relax: StackedRelax, objectives: Sequence[Objective], loader: DeviceLoader,
                  optimizer: torch.optim.Optimizer, epoch: int, settings: Settings, amp: bool,
                  quiet: bool, graph: bool = False) -> list[dict[str, float]]:
    """``train.train_epoch`` for the K models at once: the same data order, attack generators and noise seeds as
    each run alone; per-model loss, accuracy and images/s. ``graph``: as for ``train_epoch``."""
    seed, k, device = settings.train.seed, net.n_models, loader.device
    generators = [torch.Generator(device=device) for _ in range(k)]
    for g in generators:
        g.manual_seed(derive_seed(seed, "attack", epoch))
    net.seed_noise(derive_seed(seed, "noise", epoch))

    def step(x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return stacked_train_step(net, relax, objectives, optimizer, x, y, generators, amp)

    graphed = StepGraph(step, lambda: step_generators(net, *generators), fall_back=True) if graph else None
    loss_sum = torch.zeros(k, device=device)
    correct = torch.zeros(k, device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(loader.epoch(derive_seed(seed, "data", epoch)), total=len(loader), disable=quiet, leave=False,
               desc=f"epoch {epoch + 1} (x{k})", unit="batch")
    start = time.perf_counter()
    for batch_no, (x, y) in enumerate(bar, 1):
        set_lr(optimizer, lr_at(epoch + (batch_no - 1) / len(loader), settings))
        parts, logits = (graphed or step)(x, y)
        loss_sum += torch.stack([p.float() for p in parts]) * y.numel()
        correct += (logits.detach().argmax(1).unflatten(0, (k, y.numel())) == y).sum(1)
        seen += y.numel()
        if batch_no % CHECK_FINITE_EVERY == 0 or batch_no == len(loader):
            means = (loss_sum / seen).tolist()
            if not all(math.isfinite(m) for m in means):
                raise TrainingDiverged(f"non-finite loss at epoch {epoch + 1}, step {batch_no} (stacked model "
                                       f"{[i for i, m in enumerate(means) if not math.isfinite(m)]})")
            bar.set_postfix(loss=" ".join(f"{m:.2f}" for m in means))
    elapsed = time.perf_counter() - start
    return [{"train_loss": float(loss_sum[i]) / seen, "train_acc": 100 * int(correct[i]) / seen,
             "images_per_s": seen / elapsed, "epoch_s": elapsed, "stacked_images_per_s": k * seen / elapsed,
             **graph_counts(graphed)} for i in range(k)]


# --------------------------------------------------------------------------- the runs
def train_stacked(settings: Settings, experiments: Sequence[Experiment], run_dirs: Sequence[Path], *,
                  resume: bool = False, restart: bool = False, quiet: bool = False,
                  live_dirs: Sequence[Path] | None = None, time_budget: float | None = None) -> list[dict[str, Any]]:
    """Train ``experiments`` stacked, each into its run folder (``train.train``'s arguments, one per run); returns
    their train.json summaries. The runs continue together, so their saved states must be at the same epoch."""
    check_stackable(settings, experiments)
    t = settings.train
    device = pick_device(t.device)
    set_cudnn_benchmark(settings, device)
    torch.manual_seed(t.seed)
    data = training_data(settings, experiments[0].dataset, device)
    channels_last = channels_last_for(device, settings)
    models = [make_model(e, t.seed, device, channels_last, data.num_classes) for e in experiments]
    relaxes = [make_relax(m, e, settings) for m, e in zip(models, experiments)]
    optimizers = [make_optimizer(m.parameters(), settings) for m in models]
    objectives = [objective_for(e, t.pgd) for e in experiments]
    check_objectives(objectives)
    amp, graph = use_amp(settings, device), use_cuda_graph(settings, device)
    for note in [*(warn_no_phase2(settings, e) for e in experiments), cuda_graph_note(settings, device)]:
        if note:
            print(note, flush=True)
    paths = [RunPaths(Path(d)) for d in run_dirs]
    lives = [Path(d) for d in live_dirs] if live_dirs is not None else [Path("dvclive") / e.name for e in experiments]
    md5, exec_now = data.meta.get("archive_md5"), execution(settings, device)
    with contextlib.ExitStack() as held:
        records = []
        for e, p, m, o, r in zip(experiments, paths, models, optimizers, relaxes):
            lock = RunLock(p.lock).acquire()
            held.callback(lock.release)
            records.append(open_record(p, e, settings, lock, md5, amp, exec_now, m, o, r, device,
                                       resume=resume, restart=restart))
        done = {e.name: r["epochs_done"] for e, r in zip(experiments, records)}
        if len(set(done.values())) != 1:
            raise ResumeError(f"train-stacked: the runs must continue from the same epoch, their states hold {done} "
                              f"finished epochs: train them with `train --resume`, or rerun with --restart")
        net = stack_models(models)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(net.parameters(), settings)
        stack_into(net, optimizer, models, optimizers)
        if t.compile != "none":
            compile_forward(net, t.compile)
        sidecars = [run_sidecar(settings, e, m, r, data.meta, device, data.split)
                    for e, m, r in zip(experiments, models, relaxes)]
        names = [e.name for e in experiments]
        budget = EpochBudget(time_budget) if time_budget is not None else None
        if budget is not None and records[0]["epochs_done"]:
            budget.prior = records[0]["wall_s"] / records[0]["epochs_done"]
        stopped = None
        logs = [held.enter_context(open_live(live, e, settings, s, r))
                for live, e, s, r in zip(lives, experiments, sidecars, records)]
        stacked_relax = StackedRelax(net, relaxes)
        for epoch in range(records[0]["epochs_done"], t.epochs):
            if budget is not None and not budget.next_epoch_fits():
                stopped = budget.stop_message(" + ".join(names), epoch, t.epochs, paths[0].state)
                break
            start = time.perf_counter()
            try:
                stats = stacked_epoch(net, stacked_relax, objectives, data.loader, optimizer, epoch, settings, amp,
                                      quiet, graph)
            except TrainingDiverged as err:
                raise TrainingDiverged(f"{err}; " + "; ".join(f"{n}: {last_good(p, r)}"
                                                             for n, p, r in zip(names, paths, records))) from None
            unstack_into(net, optimizer, models, optimizers)
            for i, e in enumerate(experiments):
                set_lr(optimizers[i], current_lr(optimizer))
                close_epoch(settings, e, paths[i], logs[i], records[i], sidecars[i], models[i], relaxes[i],
                            optimizers[i], stats[i], epoch, data.x_val, data.y_val, amp, start)
            if budget is not None:
                budget.epoch_done()
        if stopped:
            raise BudgetReached(stopped)
        return [finish_run(settings, e, p, r, s, m, rx, {"stacked_with": [n for n in names if n != e.name]})
                for e, p, r, s, m, rx in zip(experiments, paths, records, sidecars, models, relaxes)]


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", action="append", required=True,
                   help="an entry of params.yaml's experiments (repeat: the runs trained stacked)")
    p.add_argument("--resume", action="store_true", help="as for `train`, for every run")
    p.add_argument("--restart", action="store_true", help="as for `train`, for every run")
    p.add_argument("--time-budget", type=positive_seconds, metavar="SECONDS",
                   help=f"as for `train`: stop at an epoch boundary, exit {EXIT_BUDGET_REACHED}")


def main(args: argparse.Namespace) -> int:
    settings = config.load(args.params, args.overrides)
    experiments = [settings.experiment(name) for name in args.experiment]
    run_dirs = [Path("runs") / e.name for e in experiments]
    return run_and_report(lambda: train_stacked(settings, experiments, run_dirs, resume=args.resume,
                                                restart=args.restart, quiet=args.quiet, time_budget=args.time_budget),
                          run_dirs, "the last finished epoch of every run is saved")
