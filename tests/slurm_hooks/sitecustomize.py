"""Test-only hooks for tests/test_slurm.py, active only when this directory is on PYTHONPATH and one
of these variables names the experiment being trained (nothing in paper_repro reads them):

PAPER_REPRO_TEST_SLOW_AFTER_EPOCH1  the training sleeps after its first epoch, in its first Slurm attempt
    only, so that the job reaches its time limit with an epoch saved; a requeued attempt
    (SLURM_RESTART_COUNT >= 1) runs at full speed.
PAPER_REPRO_TEST_FAIL_TRAINING      the training fails in its first epoch.

"The training" is a `train` or a `train-stacked` command whose arguments name the experiment: the hooks wrap
paper_repro.train.train_epoch and paper_repro.train_stacked.stacked_epoch, so a stacked training sleeps (or fails)
for all of its runs when it trains the named one.
"""
import functools
import importlib.abc
import importlib.util
import inspect
import os
import sys
import time

SLOW = os.environ.get("PAPER_REPRO_TEST_SLOW_AFTER_EPOCH1")
FAIL = os.environ.get("PAPER_REPRO_TEST_FAIL_TRAINING")
# module -> its one-epoch function, which takes the 0-based epoch as its parameter `epoch`
EPOCH_FUNCTIONS = {"paper_repro.train": "train_epoch", "paper_repro.train_stacked": "stacked_epoch"}


def patched(epoch_fn):
    signature = inspect.signature(epoch_fn)  # where `epoch` is, whichever function this wraps

    @functools.wraps(epoch_fn)
    def wrapper(*args, **kwargs):
        epoch = signature.bind(*args, **kwargs).arguments["epoch"]
        if FAIL in sys.argv:
            raise RuntimeError("[test hook] this training fails on purpose")
        first_attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) == 0
        if epoch >= 1 and first_attempt and SLOW in sys.argv:
            print(f"[test hook] epoch {epoch + 1}: sleeping until the time limit", flush=True)
            time.sleep(3600)
        return epoch_fn(*args, **kwargs)
    return wrapper


class PatchEpochs(importlib.abc.MetaPathFinder):
    """Wraps the functions of EPOCH_FUNCTIONS right after their module is loaded."""

    def __init__(self):
        self.finding = False

    def find_spec(self, name, path, target=None):
        if name not in EPOCH_FUNCTIONS or self.finding:
            return None
        self.finding = True  # the real finders find the module, not this one again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding = False
        spec.loader = Patch(spec.loader, EPOCH_FUNCTIONS[name])
        return spec


class Patch(importlib.abc.Loader):
    """The module's own loader, then its function ``attr`` wrapped."""

    def __init__(self, real, attr):
        self.real, self.attr = real, attr

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        self.real.exec_module(module)
        setattr(module, self.attr, patched(getattr(module, self.attr)))


if SLOW or FAIL:
    sys.meta_path.insert(0, PatchEpochs())
