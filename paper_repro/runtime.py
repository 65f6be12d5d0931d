"""What several stages share about where and how they run: the device and its autocast, the
memory layout, and the layout of a run folder. Below the stages, so data flows one way
(train -> evaluate) without one stage importing another."""
from __future__ import annotations

import argparse
import contextlib
import json
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

    @property
    def lock(self) -> Path:  # held by the one training that writes this folder (RunLock)
        return self.root / "train.lock"

    @property
    def incomplete(self) -> Path:  # present while the folder does not hold one finished run
        return self.root / "INCOMPLETE"

    def outputs(self) -> list[Path]:
        """What a run leaves in its folder (all of it belongs to one run)."""
        return [self.state.parent, self.deployed, checkpoint_sidecar(self.deployed), self.float_weights,
                checkpoint_sidecar(self.float_weights), self.summary]


def checkpoint_sidecar(path: Path) -> Path:
    return path.with_suffix(".json")  # as checkpoint.sidecar_path (runtime stays below checkpoint)


class RunLocked(ConfigError):
    """Another training holds the run folder (a one-line error, exit 2)."""


class RunLock:
    """Exclusive ownership of a run folder by one training process.

    The lock file (``runs/<name>/train.lock``) holds the owner's pid, host and start time; ownership is
    an ``flock`` on it, which the kernel drops when the owner dies however it dies, so a lock file left
    by a killed process is recognised as stale and taken over (saying whose it was). Where ``flock`` is
    not available the file's existence is the lock (``O_EXCL``), and a lock of a pid that no longer runs
    on this host is taken over. A second training of the same folder fails with a one-line error
    naming the holder.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.took_over: str | None = None  # a message when a stale lock was replaced

    @staticmethod
    def describe(info: dict) -> str:
        return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
                f"{info.get('started', '?')}")

    def _read(self) -> dict:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}

    def _held(self, info: dict) -> RunLocked:
        return RunLocked(f"{self.path.parent} is being trained by another process ({self.describe(info)}; lock "
                         f"{self.path}): wait for it to finish, or stop it; if it is not running, delete the lock")

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._held(self._read()) from None
            except OSError:  # no flock here (some network file systems): the O_EXCL protocol
                os.close(fd)
                return self._acquire_excl()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our flock: try again
                os.close(fd)
                continue
            previous = self._read()
            if previous.get("pid") is not None:
                self.took_over = f"taking over the stale lock {self.path} ({self.describe(previous)}): it is not held"
            self.fd = fd
            self._write(fd)
            return self
        raise self._held(self._read())

    def _write(self, fd: int) -> None:
        import socket
        import sys

        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)

    def _acquire_excl(self) -> "RunLock":
        import socket

        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                info = self._read()
                pid = info.get("pid")
                if info.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
                    self.took_over = f"taking over the stale lock {self.path} ({self.describe(info)}): not running"
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._held(info) from None
            self.fd = fd
            self._write(fd)
            return self
        raise self._held(self._read())

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can take a lock being removed
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: Test-only fault injection (see ``fault``): unset, it does nothing.
FAULT_ENV = "PAPER_REPRO_FAULT"


def fault(point: str, epoch: int) -> None:
    """Kill this process with SIGKILL at an injected point, for the fault-injection tests.

    ``PAPER_REPRO_FAULT=POINT:EPOCH[,POINT:EPOCH...]`` names the points, e.g. ``state-weights:2`` (epoch 2's
    resume state: weights renamed into place, sidecar not yet); the points are listed in train.FAULT_POINTS.
    ``POINT:EPOCH:pause`` instead waits there (at most 300 s) until the file named by
    PAPER_REPRO_FAULT_RELEASE exists (two trainings at once). Unset (always, outside the tests) this
    returns at once."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    items = {item.strip() for item in spec.split(",")}
    if f"{point}:{epoch}" in items:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if f"{point}:{epoch}:pause" in items:
        release = Path(os.environ.get(f"{FAULT_ENV}_RELEASE", "/nonexistent"))
        deadline = time.monotonic() + 300
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def use_amp(settings: Settings, device: torch.device) -> bool:
    return settings.train.amp == "bf16" or (settings.train.amp == "auto" and device.type == "cuda")


def use_cuda_graph(settings: Settings, device: torch.device) -> bool:
    """Graph the training step (``train.cuda_graph``): CUDA only."""
    return settings.train.cuda_graph and device.type == "cuda"


def set_cudnn_benchmark(settings: Settings, device: torch.device) -> None:
    """cuDNN picks its convolution algorithms by timing them (``train.cudnn_benchmark``): CUDA only, process-wide."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = settings.train.cudnn_benchmark


def cuda_graph_note(settings: Settings, device: torch.device) -> str | None:
    """The line to print when train.cuda_graph is asked for on a device without CUDA graphs."""
    if settings.train.cuda_graph and device.type != "cuda":
        return f"note: train.cuda_graph needs a CUDA device; training on {device.type} runs the step eagerly"
    return None


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def compile_forward(module: torch.nn.Module, mode: str) -> None:
    """Run ``module``'s forward through torch.compile in ``mode`` (``default`` or a torch.compile mode such as
    ``reduce-overhead``); the module, its parameters and its state-dict keys stay as they are."""
    module.forward = torch.compile(module.forward, mode=None if mode == "default" else mode)


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
