"""Test-only hooks for tests/test_slurm.py, active only when this directory is on PYTHONPATH and one
of these variables names the experiment being trained (nothing in paper_repro reads them):

PAPER_REPRO_TEST_SLOW_AFTER_EPOCH1  the training sleeps after its first epoch, in its first Slurm attempt
    only, so that the job reaches its time limit with an epoch saved; a requeued attempt
    (SLURM_RESTART_COUNT >= 1) runs at full speed.
PAPER_REPRO_TEST_FAIL_TRAINING      the training fails in its first epoch.
"""
import importlib.abc
import importlib.util
import os
import sys
import time

SLOW = os.environ.get("PAPER_REPRO_TEST_SLOW_AFTER_EPOCH1")
FAIL = os.environ.get("PAPER_REPRO_TEST_FAIL_TRAINING")


def patched(train_epoch):
    def wrapper(*args, **kwargs):
        epoch = args[5] if len(args) > 5 else kwargs["epoch"]
        if FAIL in sys.argv:
            raise RuntimeError("[test hook] this training fails on purpose")
        first_attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) == 0
        if epoch >= 1 and first_attempt and SLOW in sys.argv:
            print(f"[test hook] epoch {epoch + 1}: sleeping until the time limit", flush=True)
            time.sleep(3600)
        return train_epoch(*args, **kwargs)
    return wrapper


class PatchTrain(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Wraps paper_repro.train.train_epoch right after the module is loaded."""

    def find_spec(self, name, path, target=None):
        if name != "paper_repro.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        self.real = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        self.real.exec_module(module)
        module.train_epoch = patched(module.train_epoch)


if SLOW or FAIL:
    sys.meta_path.insert(0, PatchTrain())
