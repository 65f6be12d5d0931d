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


#: Every temporary name ``write_with`` makes matches this glob (``.<stem>.<random>.tmp<suffix>``): what
#: ``remove_temporaries`` deletes after a hard kill left one behind.
TEMP_GLOB = ".*.tmp*"


def write_with(path: str | os.PathLike, write: Callable[[Path], Any],
               before_replace: Callable[[], Any] | None = None) -> Path:
    """Call ``write(tmp_path)`` (e.g. a figure's savefig), then move the result to ``path``.
    ``before_replace`` (tests: fault injection) runs between the two."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result gets the mode any new file gets
    try:
        write(Path(tmp))
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None or e.filename == tmp:  # say which file could not be written, not its temp name
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False,
                before_replace: Callable[[], Any] | None = None) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:  # checkpoints: survive a power cut, not only a crash
                f.flush()
                os.fsync(f.fileno())
    return write_with(path, write, before_replace)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    return write_text(path, json.dumps(obj, allow_nan=False, **dumps) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the renames inside folder ``path`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of interrupted ``write_with`` calls anywhere under ``folder`` (a hard kill
    between the temp file and its rename leaves one); returns what was removed. Call it only while no
    other process writes into ``folder`` (the training lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in sorted(folder.rglob(TEMP_GLOB)):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def file_md5(path: str | os.PathLike) -> str:
    """The md5 of a file's bytes: how published files and wheels are named in their manifests."""
    import hashlib

    return hashlib.md5(Path(path).read_bytes()).hexdigest()
