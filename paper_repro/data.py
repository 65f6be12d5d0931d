"""CIFAR-10: fetch, verify, read safely, validate, and write the training-ready artifact.

Why this shape: the archive is the only input that comes from outside, so everything about it is
checked (archive md5, per-file md5s, member paths, pickle contents, shapes, labels) and recorded in
``meta.json``; the arrays land in one safetensors file that loads in milliseconds and never unpickles.
Nothing is extracted to disk: the needed members are read from the tar in memory after every member
has been checked, and the output folder is swapped in only when complete.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import shutil
import tarfile
import time
import urllib.error
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import calculate_md5, download_url

from . import __version__
from .config import ARCHIVE_ENV, OFFICIAL_MD5, OFFICIAL_URL, DataSettings

ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_FILES = [name for name, _ in CIFAR10.train_list]
TEST_FILES = [name for name, _ in CIFAR10.test_list]
META_FILE = CIFAR10.meta["filename"]
# The per-file checksums torchvision pins for the official archive (paper-spec §9 lists the same).
OFFICIAL_FILE_MD5 = {**dict(CIFAR10.train_list), **dict(CIFAR10.test_list), META_FILE: CIFAR10.meta["md5"]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARRAYS_FILE = "cifar10.safetensors"
DOWNLOAD_RETRIES = 3
DOWNLOAD_BACKOFF_S = 2.0  # seconds, times the attempt number
META_JSON = "meta.json"


class DataError(RuntimeError):
    """Bad or unreachable input; the message is one line naming the problem and what to do."""


@dataclass(frozen=True)
class Prepared:
    x_train: np.ndarray  # uint8 (N, 3, 32, 32)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    meta: dict[str, Any]


# --------------------------------------------------------------------------- source
def resolve_source(cli_source: str | None, settings: DataSettings) -> str:
    """Which archive to use: --source, then $CIFAR10_ARCHIVE, then data.archive if present, then data.url."""
    for candidate in (cli_source, os.environ.get(ARCHIVE_ENV)):
        if candidate:
            return candidate
    if Path(settings.archive).is_file():
        return settings.archive
    return settings.url


def is_url(source: str) -> bool:
    return source.split("://", 1)[0] in ("http", "https", "ftp", "file") and "://" in source


def obtain_archive(source: str, md5: str | None, download_to: Path) -> Path:
    """Return a local, checksum-verified archive path, downloading ``source`` first if it is a URL."""
    if is_url(source):
        return download(source, md5, download_to)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"archive not found: {path} (pass an existing cifar-10-python.tar.gz with --source "
                        f"or {ARCHIVE_ENV}=PATH, or omit them to download the official archive)")
    if md5 is not None:
        actual = calculate_md5(path)
        if actual != md5:
            raise DataError(f"md5 mismatch for {path}: expected {md5}, got {actual} "
                            f"(wrong or damaged file; fetch it again or drop the expected md5)")
    return path


def download(url: str, md5: str | None, dest: Path, retries: int | None = None,
             backoff_s: float | None = None) -> Path:
    """Download ``url`` into a temp folder beside ``dest`` with torchvision (progress bar), verify, rename.

    A failed or corrupt transfer is retried; ``dest`` only ever appears complete and verified.
    """
    dest = Path(dest)
    retries = DOWNLOAD_RETRIES if retries is None else retries
    backoff_s = DOWNLOAD_BACKOFF_S if backoff_s is None else backoff_s
    if dest.is_file() and md5 is not None and calculate_md5(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.parent / f".{dest.name}.part-{os.getpid()}"
    problem = "no attempt made"
    try:
        for attempt in range(1, retries + 1):
            shutil.rmtree(part, ignore_errors=True)
            try:
                download_url(url, str(part), filename=dest.name, md5=None)
            except (urllib.error.URLError, OSError, http.client.HTTPException, RuntimeError, ValueError) as e:
                problem = f"{e.__class__.__name__}: {getattr(e, 'reason', e)}"
            else:
                got = calculate_md5(part / dest.name)
                if md5 is None or got == md5:
                    os.replace(part / dest.name, dest)
                    return dest
                problem = f"md5 mismatch: expected {md5}, got {got}"
            if attempt < retries:
                time.sleep(backoff_s * attempt)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    raise DataError(f"could not download {url} after {retries} attempts ({problem}); check the network, "
                    f"or pass a local archive with --source PATH or {ARCHIVE_ENV}=PATH")


# --------------------------------------------------------------------------- archive
def read_members(archive: Path) -> dict[str, bytes]:
    """Read the batch files of a CIFAR-10 python archive, refusing unsafe or unexpected members."""
    wanted = {f"{ARCHIVE_DIR}/{name}" for name in (*TRAIN_FILES, *TEST_FILES, META_FILE)}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member_is_safe(m, archive)
            found = {str(PurePosixPath(m.name)): m for m in members if m.isfile()}
            missing = sorted(n for n in wanted if n not in found)
            if missing:
                raise DataError(f"{archive}: not a CIFAR-10 python archive, missing {missing[0]} "
                                f"(expected {ARCHIVE_DIR}/data_batch_1..5, test_batch, batches.meta)")
            return {PurePosixPath(n).name: tar.extractfile(found[n]).read() for n in sorted(wanted)}
    except DataError:
        raise
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"{archive}: unreadable archive ({e.__class__.__name__}: {detail}); the file is truncated "
                        f"or corrupt, fetch it again") from None


def _check_member_is_safe(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: refusing archive with absolute member path {name!r}")
    if ".." in parts:
        raise DataError(f"{archive}: refusing archive with member escaping the target folder {name!r}")
    if member.issym() or member.islnk():
        raise DataError(f"{archive}: refusing archive with link member {name!r} -> {member.linkname!r}")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: refusing archive with special member {name!r} (device, fifo or other)")


class _BatchUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles of dicts of lists and one numpy array: allow exactly that."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(blob: bytes, name: str) -> dict[str, Any]:
    try:
        obj = _BatchUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as e:  # any decode problem is a layout problem for the user
        raise DataError(f"{name}: not a CIFAR-10 python batch ({e.__class__.__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: not a CIFAR-10 python batch (a {type(obj).__name__}, expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _parse_batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(blob, name)
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{name}: wrong layout, keys {sorted(batch)} (expected 'data' and 'labels')")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataError(f"{name}: images must be uint8 rows of 3x32x32=3072 values, got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: {labels.shape} integer labels expected for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{name}: labels must lie in 0..9, found {int(labels.min())}..{int(labels.max())}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def parse_archive(members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    meta = _unpickle(members[META_FILE], META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != len(CLASSES):
        raise DataError(f"{META_FILE}: expected 10 label_names, got {names!r}")
    train = [_parse_batch(members[n], n) for n in TRAIN_FILES]
    x_test, y_test = _parse_batch(members[TEST_FILES[0]], TEST_FILES[0])
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    present = np.unique(y_train)
    if present.size != len(CLASSES):
        raise DataError(f"training batches hold {present.size} classes, expected 10")
    return x_train, y_train, x_test, y_test


# --------------------------------------------------------------------------- prepare
def prepare(source: str, out: Path, *, md5: str | None = None, train_limit: int | None = None,
            test_limit: int | None = None, expect_counts: list[int] | None = None,
            download_to: Path = Path("data/cifar-10-python.tar.gz")) -> dict[str, Any]:
    """The ``prepare`` stage: archive -> ``out/cifar10.safetensors`` + ``out/meta.json``."""
    if is_url(source) and md5 is None and source == OFFICIAL_URL:
        md5 = OFFICIAL_MD5
    archive = obtain_archive(source, md5, download_to)
    archive_md5 = calculate_md5(archive)
    members = read_members(archive)
    x_train, y_train, x_test, y_test = parse_archive(members)
    full = [int(y_train.size), int(y_test.size)]
    if expect_counts is not None and full != list(expect_counts):
        raise DataError(f"{archive}: {full[0]} train / {full[1]} test images, expected "
                        f"{expect_counts[0]} / {expect_counts[1]} (set data.expect_counts: null for a partial archive)")
    x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    file_md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in sorted(members.items())}
    meta = {  # file names, never machine paths: this record travels into published results
        "source": source if is_url(source) else Path(source).name,
        "archive": Path(archive).name,
        "archive_md5": archive_md5,
        "archive_bytes": archive.stat().st_size,
        "files_md5": file_md5,
        "official": all(file_md5[n] == OFFICIAL_FILE_MD5[n] for n in OFFICIAL_FILE_MD5),
        "counts_in_archive": {"train": full[0], "test": full[1]},
        "counts": {"train": int(y_train.size), "test": int(y_test.size)},
        "limits": {"train": train_limit, "test": test_limit},
        "classes": list(CLASSES),
        "class_counts": {"train": np.bincount(y_train, minlength=10).tolist(),
                         "test": np.bincount(y_test, minlength=10).tolist()},
        "layout": {"images": "uint8 N x 3 x 32 x 32 (RGB planes)", "labels": "int64"},
        "paper_repro_version": __version__,
    }
    arrays = {"x_train": np.ascontiguousarray(x_train), "y_train": y_train,
              "x_test": np.ascontiguousarray(x_test), "y_test": y_test}
    _write_folder_atomically(Path(out), arrays, meta)
    return meta


def _write_folder_atomically(out: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Build the folder under a temp name and swap it in, so a failure leaves the old one untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(arrays, str(tmp / ARRAYS_FILE))
        os.chmod(tmp / ARRAYS_FILE, 0o644)
        (tmp / META_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def load_prepared(folder: str | Path) -> Prepared:
    """Load ``data/prepared/`` (no unpickling); a clear error when it is missing."""
    folder = Path(folder)
    arrays_path, meta_path = folder / ARRAYS_FILE, folder / META_JSON
    if not arrays_path.is_file() or not meta_path.is_file():
        raise DataError(f"{folder}: no prepared data (run `python -m paper_repro prepare` first)")
    arrays = load_file(str(arrays_path))
    meta = json.loads(meta_path.read_text())
    return Prepared(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], meta)


def validation_split(n_train: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded hold-out of ``val_size`` training images for model selection (never the test set)."""
    if not 0 <= val_size < n_train:
        raise DataError(f"val_size {val_size} must be smaller than the {n_train} training images")
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """The data facts every downstream artifact repeats."""
    return {"official": bool(meta.get("official")), "archive_md5": meta.get("archive_md5"),
            "source": meta.get("source"), "n_train": meta.get("counts", {}).get("train"),
            "n_test": meta.get("counts", {}).get("test")}
