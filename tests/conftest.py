"""Shared fixtures: tiny synthetic CIFAR-10 archives and prepared folders (all offline)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CI", "1")  # quiet progress bars in tests

from archive_factory import make_archive  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def tiny_archive(tmp_path: Path) -> Path:
    """A valid official-format archive with 15 training and 2 test images per class."""
    return make_archive(tmp_path / "cifar-10-python.tar.gz")


@pytest.fixture
def prepared_dir(tmp_path: Path, tiny_archive: Path) -> Path:
    from paper_repro.data import prepare
    out = tmp_path / "prepared"
    prepare(str(tiny_archive), out)
    return out


@pytest.fixture
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors run faster on one intra-op thread (and avoid OpenMP spinning on a busy 2-core box)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CUDA_SKIP_REASONS = ("needs CUDA", "needs a GPU")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; applied to every test that skips without one, "
                                       "so `pytest -m cuda` runs exactly the GPU-only tests (gpu-check does)")


def pytest_collection_modifyitems(config, items):
    """Mark the tests that skip without CUDA (skipif reason 'needs CUDA' / 'needs a GPU') as `cuda`."""
    for item in items:
        reasons = [str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif")]
        if any(r in reason for reason in reasons for r in CUDA_SKIP_REASONS):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture
def float64():
    """Train and compare in float64 (the loader and the models follow torch's default dtype): fp32 rounding of
    grouped against single convolutions grows past any useful tolerance within a few SGD steps."""
    import torch
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
