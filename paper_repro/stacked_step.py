"""One training step of K stacked experiments (``paper_repro.stacked``), equal to K separate ``train_step``s.

Why: experiments that share a data pass (same seed, batch size, schedule and loss kind; the models and
quantizers may differ) can train in one process on one GPU with K times fewer kernel launches. What
makes the stacked step equal to the separate ones (within float tolerance, tests/test_stacked.py):
- every model attacks its own rows of the stacked batch; the summed cross-entropy of the attack and the
  summed per-model training loss give each model exactly the gradient it would get alone (the groups
  share no weights), and SGD with momentum and weight decay is elementwise;
- model i's PGD random start is drawn from its own generator with its own shape;
- ``StackedRelax`` applies model i's BinaryRelax/BinaryConnect schedule and quantizer to model i's slice of
  every selected tensor (one scale per member tensor, as when the member is trained alone).
Supported losses: natural, pgd_at and tradeoff (all stacked models must use the same kind and attack).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attacks
from .config import AttackSettings
from .losses import Objective
from .quant import BinaryRelax
from .runtime import autocast
from .stacked import StackedEnResNet, split_member_key, stacked_name
from .stacking import STACKABLE_LOSSES



def check_objectives(objectives: Sequence[Objective]) -> None:
    """Stacked models must make the same passes (same loss kind and attack), or their noise streams and
    batch-norm statistics would not follow the separate runs; one line says which setting differs."""
    if not objectives:
        raise ValueError("stacked training needs at least one objective")
    kinds = sorted({o.kind for o in objectives})
    if len(kinds) != 1 or kinds[0] not in STACKABLE_LOSSES:
        raise ValueError(f"stacked training needs one loss kind among {STACKABLE_LOSSES}, got {kinds}")
    if len({o.attack for o in objectives}) != 1:
        raise ValueError("stacked training needs one training attack (train.pgd) for every model")


class StackedRelax:
    """Per-model BinaryRelax on the member slices of a stacked network.

    ``relaxes[i]`` is model i's BinaryRelax built on a single EnResNet of model i's architecture: it
    supplies the selected tensor names, the quantizer and the eta schedule; the weights it swaps live in
    the stacked network.
    """

    def __init__(self, stacked: StackedEnResNet, relaxes: Sequence[BinaryRelax]):
        if len(relaxes) != stacked.n_models:
            raise ValueError(f"one BinaryRelax per stacked model: {stacked.n_models} models, {len(relaxes)} given")
        self.relaxes = list(relaxes)
        self.groups = stacked.groups
        params = dict(stacked.named_parameters())
        self.slices: list[tuple[int, str, int, bool]] = []  # (model, stacked name, group, is fc)
        for i, relax in enumerate(self.relaxes):
            for name in relax.names:
                member, rest = split_member_key(name)
                target = stacked_name(rest)
                if target not in params:
                    raise KeyError(f"{name} of model {i} is not a parameter of the stacked network")
                self.slices.append((i, target, stacked.offsets[i] + member, rest.startswith("fc.")))
        self.params = {name: params[name] for _, name, _, _ in self.slices}
        self._saved: dict[str, Tensor] = {}

    def _view(self, tensor: Tensor, group: int, fc: bool) -> Tensor:
        return tensor[group] if fc else tensor.chunk(self.groups, dim=0)[group]

    @contextlib.contextmanager
    def _swap(self, make: Callable[[BinaryRelax], Callable[[Tensor], Tensor]]) -> Iterator[None]:
        with torch.no_grad():
            for name, p in self.params.items():
                buf = self._saved.get(name)
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                    buf = self._saved[name] = torch.empty_like(p, memory_format=torch.preserve_format)
                buf.copy_(p)
            for i, name, group, fc in self.slices:
                w = self._view(self._saved[name], group, fc)
                self._view(self.params[name], group, fc).copy_(make(self.relaxes[i])(w))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self._saved[name])

    def relaxed(self) -> contextlib.AbstractContextManager[None]:
        """U of each model (its phase and eta) in its slices; run attack, forward and backward inside."""
        return self._swap(lambda relax: relax.relaxed_weight)

    def deployed(self) -> contextlib.AbstractContextManager[None]:
        """Q(W) of each model in its slices (the deployed models): evaluate inside."""
        return self._swap(lambda relax: relax.quantize)

    def end_epoch(self, epoch: int | None = None) -> None:
        for relax in self.relaxes:
            relax.end_epoch(epoch)


def _uniform_like(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """U(-eps, eps) exactly as attacks.pgd draws its random start (same generator use, shape, dtype)."""
    device = generator.device if generator is not None else x.device
    return torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device).mul_(2 * eps).sub_(eps)


def stacked_pgd(model: StackedEnResNet, x: Tensor, y: Tensor, attack: AttackSettings,
                generators: Sequence[torch.Generator | None]) -> Tensor:
    """``attacks.pgd`` (one restart, cross-entropy) for every stacked model at once: model i's rows of the
    (K*B) batch start from model i's generator; the summed loss gives each model its own input gradient."""
    if len(generators) != model.n_models:
        raise ValueError(f"one generator per stacked model: {model.n_models} models, {len(generators)} given")
    eps = attack.eps
    x0 = x.detach()
    lo, hi = (x0 - eps).clamp_(min=0.0), (x0 + eps).clamp_(max=1.0)
    with attacks.attack_mode(model):
        adv = x0.clone()
        if attack.random_start:
            for rows, generator in zip(adv.chunk(model.n_models), generators):
                rows.add_(_uniform_like(rows, eps, generator))
            adv.clamp_(0.0, 1.0)
        adv.requires_grad_(True)
        for _ in range(attack.steps):
            with torch.enable_grad():
                value = attacks.per_example_loss(model(adv), y, "ce").sum()
                (grad,) = torch.autograd.grad(value, adv)
            with torch.no_grad():
                adv.add_(grad.sign_(), alpha=attack.step)
                adv.clamp_(lo, hi)
    return adv.detach()


def stacked_loss(objectives: Sequence[Objective], model: StackedEnResNet, x: Tensor, y: Tensor,
                 x_adv: Tensor | None) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(sum of the per-model losses, logits for the running accuracy, per-model losses), each model's loss
    computed as ``Objective.loss`` computes it (same passes, in the same order)."""
    k = len(objectives)
    kind = objectives[0].kind

    def ce(logits: Tensor) -> list[Tensor]:
        return [F.cross_entropy(part.float(), target) for part, target in zip(logits.chunk(k), y.chunk(k))]

    if kind == "natural":
        logits = model(x)
        parts = ce(logits)
    elif kind == "pgd_at":
        logits = model(x_adv)
        parts = ce(logits)
    else:  # tradeoff: adversarial pass first, then the clean pass, as in losses.Objective
        logits = model(x_adv)
        nat = model(x)
        parts = [o.params["w_adv"] * a + o.params["w_nat"] * n for o, a, n in zip(objectives, ce(logits), ce(nat))]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total, logits, parts


def stacked_train_step(model: StackedEnResNet, relax: StackedRelax, objectives: Sequence[Objective],
                       optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
                       generators: Sequence[torch.Generator | None], amp: bool) -> tuple[list[Tensor], Tensor]:
    """``train.train_step`` for K models sharing the batch (x, y): returns (per-model losses, logits of the
    K*B rows). Model i's gradient is the one it would get alone; one optimizer holds all the weights."""
    check_objectives(objectives)
    k = model.n_models
    xs, ys = x.repeat(k, 1, 1, 1), y.repeat(k)
    optimizer.zero_grad(set_to_none=True)
    with relax.relaxed():
        with autocast(amp, x.device):
            first = objectives[0]
            x_adv = stacked_pgd(model, xs, ys, first.attack, generators) if first.needs_adversarial else None
            model.train()
            loss, logits, parts = stacked_loss(objectives, model, xs, ys, x_adv)
        loss.backward()
    optimizer.step()
    return [p.detach() for p in parts], logits.detach()  # detached: see train.train_step
