"""Which runs can train stacked (``train-stacked``, ``grid --stack K``), torch-free so that ``grid`` plans with it.

Runs stack when one data pass serves them all and the stacked step computes each exactly: the same dataset, one
ResNet depth (plain and En_k models mix: every member is a group of the stacked network) and one loss kind the
stacked step implements (its trade-off weights may differ). The profile gives them the same schedule and attack.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import RESNET_NAME, ConfigError, Experiment, Settings

STACKABLE_LOSSES = ("natural", "pgd_at", "tradeoff")


def stack_key(settings: Settings, experiment: Experiment) -> tuple[str, int, str] | None:
    """What runs must share to stack (dataset, ResNet depth, loss kind); None: this run cannot stack."""
    match = RESNET_NAME.match(experiment.model)
    if match is None or experiment.loss not in STACKABLE_LOSSES:
        return None
    return experiment.dataset or settings.data.dataset, int(match["depth"]), experiment.loss


def members_in_one_pass(settings: Settings, experiment: Experiment) -> bool:
    """An En_k ResNet (k > 1) that can stack: as a stack of one, its k members are one grouped network, computed in
    one pass instead of k (what ``grid --stack`` does for an ensemble that shares a stack with no other run)."""
    if stack_key(settings, experiment) is None:  # a stackable run is an [en<k>]resnet<depth>
        return False
    return int(RESNET_NAME.match(experiment.model)["k"] or 1) > 1


def stacks(settings: Settings, experiments: Sequence[Experiment], k: int) -> list[list[Experiment]]:
    """``experiments`` in groups of at most ``k`` that stack (in order; a run that cannot stack is alone)."""
    if k < 1:
        raise ConfigError(f"a stack holds at least one run, got {k}")
    groups: dict[Any, list[Experiment]] = {}
    for i, e in enumerate(experiments):
        groups.setdefault(stack_key(settings, e) or ("alone", i), []).append(e)
    return [group[i:i + k] for group in groups.values() for i in range(0, len(group), k)]


def check_stackable(settings: Settings, experiments: Sequence[Experiment]) -> None:
    """ConfigError naming what keeps ``experiments`` from training as one stack."""
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise ConfigError(f"train-stacked: an experiment is named twice in {names}")
    keys = {e.name: stack_key(settings, e) for e in experiments}
    alone = [n for n, key in keys.items() if key is None]
    if alone:
        raise ConfigError(f"train-stacked: {', '.join(alone)} cannot stack (a [en<k>]resnet<depth> model with loss "
                          f"{' or '.join(STACKABLE_LOSSES)} can): train it with `train`")
    if len(set(keys.values())) != 1:
        raise ConfigError("train-stacked: runs stack when they share dataset, ResNet depth and loss kind; got "
                          + "; ".join(f"{n}: {k}" for n, k in keys.items()))
