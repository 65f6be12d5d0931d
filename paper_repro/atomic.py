"""Atomic file writes: a temp file in the target folder, then ``os.replace``.

Why: the design's rule that a crash never leaves half a file (DVC would cache it, a resumed run would read
it). One implementation for every stage instead of one per module.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_with(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` (e.g. a figure's savefig), then move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets the mode any new file gets
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:  # checkpoints: survive a power cut, not only a crash
                f.flush()
                os.fsync(f.fileno())
    return write_with(path, write)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    return write_text(path, json.dumps(obj, allow_nan=False, **dumps) + "\n")
