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
