"""What several stages share about where and how they run: the device and its autocast, the
memory layout, and the layout of a run folder. Below the stages, so data flows one way
(train -> evaluate) without one stage importing another."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, Settings


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def state(self) -> Path:  # resume state: float W, optimizer, schedule, history
        return self.root / "state" / "last.safetensors"

    @property
    def deployed(self) -> Path:  # the selected model as deployed: Q(W) for quantized tensors
        return self.root / "deployed.safetensors"

    @property
    def float_weights(self) -> Path:  # the float W of the selected epoch
        return self.root / "float.safetensors"

    @property
    def summary(self) -> Path:
        return self.root / "train.json"


def use_amp(settings: Settings, device: torch.device) -> bool:
    return settings.train.amp == "bf16" or (settings.train.amp == "auto" and device.type == "cuda")


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def channels_last_for(device: torch.device, settings: Settings) -> bool:
    """channels_last pays on GPUs (tensor-core convs) and on CPU too (oneDNN NHWC convs: PGD-10 of a
    resnet20 batch took 3.4 s instead of 4.4 s on the 2-core CI machine)."""
    return settings.train.channels_last


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


#: Exit status of ``train --time-budget`` when it stopped at an epoch boundary to stay within the budget
#: (EX_TEMPFAIL of sysexits.h: "try again"); the state is saved, continue with ``--resume``.
EXIT_BUDGET_REACHED = 75


def budget_clock() -> float:
    """The clock of training time budgets (a module function so tests can substitute a fake one)."""
    return time.monotonic()


class EpochBudget:
    """Says at each epoch boundary whether the next epoch still fits a wall-clock budget.

    Why: the paper grid runs in time-limited pieces (short GPU windows, cluster wall-time limits); an epoch
    killed mid-way is lost, an epoch not started costs nothing. The estimate of the next epoch is the
    longest of the last epoch of this call and ``prior_epoch_s`` (the mean epoch of earlier calls); with
    neither (the very first epoch) the epoch runs. The clock starts when the budget is made.
    """

    def __init__(self, seconds: float, prior_epoch_s: float | None = None):
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"time budget must be a positive number of seconds, got {seconds!r}")
        self.seconds = float(seconds)
        self.clock = budget_clock
        self.started = self.clock()
        self.prior = prior_epoch_s
        self.last: float | None = None
        self._epoch_started: float | None = None

    def estimate(self) -> float | None:
        """Seconds the next epoch is expected to take (None: nothing measured yet)."""
        known = [s for s in (self.last, self.prior) if s is not None]
        return max(known) if known else None

    def next_epoch_fits(self) -> bool:
        """True when the next epoch is expected to end within the budget; starts timing that epoch."""
        now = self.clock()
        estimate = self.estimate()
        if estimate is not None and now - self.started + estimate > self.seconds:
            return False
        self._epoch_started = now
        return True

    def epoch_done(self) -> None:
        """Record the length of the epoch just finished (from ``next_epoch_fits`` to now)."""
        if self._epoch_started is not None:
            self.last = self.clock() - self._epoch_started

    def elapsed(self) -> float:
        return self.clock() - self.started

    def stop_message(self, run: str, epochs_done: int, epochs: int, state: Path) -> str:
        """Why training stops here; a ConfigError when not even one epoch fits (every rerun would stop)."""
        estimate = self.estimate() or 0.0
        if self.last is None:
            raise ConfigError(f"--time-budget {self.seconds:g} s is shorter than one epoch of {run} "
                              f"(about {estimate:.0f} s measured): raise it")
        return (f"time budget: {run} stopped after epoch {epochs_done}/{epochs} ({self.elapsed():.0f} s of "
                f"{self.seconds:g} s used; the next epoch takes about {estimate:.0f} s); state saved in {state}; "
                f"continue with --resume (exit {EXIT_BUDGET_REACHED})")


def positive_seconds(text: str) -> float:
    """argparse type of --time-budget and similar: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value
