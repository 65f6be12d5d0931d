"""CIFAR-10, CIFAR-100 and SVHN: fetch, verify, read safely, validate, and write the training-ready artifact.

Why this shape: the archive is the only input that comes from outside, so everything about it is
checked (archive md5, per-file md5s, member paths, pickle contents, shapes, labels) and recorded in
``meta.json``; the arrays land in one safetensors file that loads in milliseconds and never unpickles.
Nothing is extracted to disk: the needed members are read from the tar in memory after every member
has been checked, and the output folder is swapped in only when complete. CIFAR-100 is the same python
archive layout with 100 fine labels; SVHN's official ``train_32x32.mat`` / ``test_32x32.mat`` are read
with scipy.io.loadmat (what torchvision uses; MATLAB files hold no code), digit 0 stored as label 10.

The profile's dataset (``data.dataset``) is prepared into ``data.prepared``; every other dataset an
experiment names goes to ``data.prepared/<dataset>/``, inside the same DVC output.
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
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file
from torchvision.datasets import CIFAR10, CIFAR100, SVHN
from torchvision.datasets.utils import calculate_md5, download_url

from . import __version__, recipe
from .config import ARCHIVE_ENV, OFFICIAL_MD5, OFFICIAL_URL, DataSettings

ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_FILES = [name for name, _ in CIFAR10.train_list]
TEST_FILES = [name for name, _ in CIFAR10.test_list]
META_FILE = CIFAR10.meta["filename"]
# The per-file checksums torchvision pins for the official archive (paper-spec §9 lists the same).
OFFICIAL_FILE_MD5 = {**dict(CIFAR10.train_list), **dict(CIFAR10.test_list), META_FILE: CIFAR10.meta["md5"]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARRAYS_FILE = "cifar10.safetensors"  # the CIFAR-10 arrays; other datasets: arrays_file(dataset)
SVHN_SPLITS = {split: (SVHN.split_list[split][1], SVHN.split_list[split][2]) for split in ("train", "test")}
SVHN_URL = SVHN.split_list["train"][0].rsplit("/", 1)[0] + "/"
SVHN_CLASSES = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class CifarLayout:
    """What differs between the CIFAR-10 and CIFAR-100 python archives (taken from torchvision)."""
    dataset: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str        # 'labels' (CIFAR-10) or 'fine_labels' (CIFAR-100)
    names_key: str        # 'label_names' or 'fine_label_names'
    file_md5: dict[str, str]

    @property
    def num_classes(self) -> int:
        return recipe.NUM_CLASSES[self.dataset]


def _layout(tv: type, dataset: str, label_key: str) -> CifarLayout:
    files = {**dict(tv.train_list), **dict(tv.test_list), tv.meta["filename"]: tv.meta["md5"]}
    return CifarLayout(dataset, tv.base_folder, tuple(n for n, _ in tv.train_list), tuple(n for n, _ in tv.test_list),
                       tv.meta["filename"], label_key, tv.meta["key"], files)


CIFAR_LAYOUTS = {"cifar10": _layout(CIFAR10, "cifar10", "labels"),
                 "cifar100": _layout(CIFAR100, "cifar100", "fine_labels")}


@dataclass(frozen=True)
class OfficialSource:
    """Where a dataset comes from: its environment variable (a local copy), cache path, URL and md5."""
    env: str
    cache: str
    url: str
    md5: str | None   # of the archive; None for SVHN (two files, each with its own md5)


SOURCES = {
    "cifar10": OfficialSource(ARCHIVE_ENV, "data/cifar-10-python.tar.gz", OFFICIAL_URL, OFFICIAL_MD5),
    "cifar100": OfficialSource("CIFAR100_ARCHIVE", "data/cifar-100-python.tar.gz", CIFAR100.url, CIFAR100.tgz_md5),
    "svhn": OfficialSource("SVHN_DIR", "data/svhn", SVHN_URL, None),
}


def arrays_file(dataset: str) -> str:
    return f"{dataset}.safetensors"
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

    @property
    def dataset(self) -> str:
        return dataset_of(self.meta)

    @property
    def num_classes(self) -> int:
        """What the model's head needs (folders prepared before CIFAR-100/SVHN existed are CIFAR-10)."""
        return int(self.meta.get("num_classes", recipe.NUM_CLASSES[self.dataset]))


def dataset_of(meta: dict[str, Any]) -> str:
    return str(meta.get("dataset", recipe.DEFAULT_DATASET))


# --------------------------------------------------------------------------- source
def resolve_source(cli_source: str | None, settings: DataSettings) -> str:
    """Which archive to use: --source, then the dataset's variable ($CIFAR10_ARCHIVE, $CIFAR100_ARCHIVE,
    $SVHN_DIR), then data.archive if present, then data.url."""
    for candidate in (cli_source, os.environ.get(SOURCES[settings.dataset].env)):
        if candidate:
            return candidate
    archive = Path(settings.archive)
    if archive.is_file() or (settings.dataset == "svhn" and archive.is_dir()):
        return settings.archive
    return settings.url


def resolve_extra_source(dataset: str, settings: DataSettings) -> str:
    """Source of a dataset other than the profile's: $<ENV>, then its cached official copy beside
    data.archive, then its official URL."""
    src = SOURCES[dataset]
    cached = Path(settings.archive).parent / Path(src.cache).name
    for candidate in (os.environ.get(src.env), str(cached) if cached.exists() else None):
        if candidate:
            return candidate
    return src.url


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
#: Largest batch file read into memory: CIFAR-100's train file is 50,000 x 3,072 bytes plus labels (~155 MB).
MAX_MEMBER_BYTES = 200 * 2**20


def read_members(archive: Path, layout: CifarLayout | None = None) -> dict[str, bytes]:
    """Read the batch files of a CIFAR python archive, refusing unsafe or unexpected members."""
    lay = layout or CIFAR_LAYOUTS["cifar10"]
    wanted = {f"{lay.folder}/{name}" for name in (*lay.train_files, *lay.test_files, lay.meta_file)}
    try:
        check_gzip_stream(archive)
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member_is_safe(m, archive)
            found = {str(PurePosixPath(m.name)): m for m in members if m.isfile()}
            for name in wanted & set(found):
                if found[name].size > MAX_MEMBER_BYTES:
                    raise DataError(f"{archive}: member {name} claims {found[name].size:,} bytes, more than any "
                                    f"{recipe.DATASET_LABELS[lay.dataset]} batch ({MAX_MEMBER_BYTES:,}): refusing it")
            missing = sorted(n for n in wanted if n not in found)
            if missing:
                raise DataError(f"{archive}: not a {recipe.DATASET_LABELS[lay.dataset]} python archive, missing "
                                f"{missing[0]} (expected {', '.join(sorted(wanted))})")
            return {PurePosixPath(n).name: tar.extractfile(found[n]).read() for n in sorted(wanted)}
    except DataError:
        raise
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"{archive}: unreadable archive ({e.__class__.__name__}: {detail}); the file is truncated "
                        f"or corrupt, fetch it again") from None


def check_gzip_stream(archive: Path, chunk: int = 2**22) -> None:
    """Decompress a gzip file to its end, so that its CRC is checked: tar stops reading before the end, and a
    flipped byte would otherwise surface later as a malformed batch instead of a corrupt archive."""
    with open(archive, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return
    with gzip.open(archive, "rb") as g:
        while g.read(chunk):
            pass


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


def _parse_batch(blob: bytes, name: str, label_key: str = "labels",
                 num_classes: int = len(CLASSES)) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(blob, name)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{name}: wrong layout, keys {sorted(batch)} (expected 'data' and {label_key!r})")
    data, labels = batch["data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataError(f"{name}: images must be uint8 rows of 3x32x32=3072 values, got "
                        f"{getattr(data, 'dtype', type(data).__name__)} {shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: {labels.shape} integer labels expected for {data.shape[0]} images")
    _check_labels(labels, num_classes, name)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{name}: labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}")


def parse_archive(members: dict[str, bytes], layout: CifarLayout | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, y_train, x_test, y_test, _ = parse_cifar(members, layout or CIFAR_LAYOUTS["cifar10"])
    return x_train, y_train, x_test, y_test


def parse_cifar(members: dict[str, bytes], lay: CifarLayout
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The train and test arrays of a CIFAR-10/100 archive and its class names (CIFAR-100: fine labels)."""
    meta = _unpickle(members[lay.meta_file], lay.meta_file)
    names = meta.get(lay.names_key)
    if not isinstance(names, list) or len(names) != lay.num_classes:
        raise DataError(f"{lay.meta_file}: expected {lay.num_classes} {lay.names_key}, got {names!r}")
    train = [_parse_batch(members[n], n, lay.label_key, lay.num_classes) for n in lay.train_files]
    x_test, y_test = _parse_batch(members[lay.test_files[0]], lay.test_files[0], lay.label_key, lay.num_classes)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    _check_all_classes(y_train, lay.num_classes)
    _check_all_classes(y_test, lay.num_classes, "test")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return x_train, y_train, x_test, y_test, classes


def _check_all_classes(y: np.ndarray, num_classes: int, split: str = "training") -> None:
    present = np.unique(y)
    if present.size != num_classes:
        raise DataError(f"{split} batches hold {present.size} classes, expected {num_classes}")


# --------------------------------------------------------------------------- SVHN
def obtain_svhn(source: str, download_to: Path) -> Path:
    """The folder holding train_32x32.mat and test_32x32.mat; from the official URL, downloaded and checked."""
    if is_url(source):
        base = source if source.endswith("/") else source + "/"
        for name, md5 in SVHN_SPLITS.values():
            download(base + name, md5, Path(download_to) / name)
        return Path(download_to)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DataError(f"SVHN folder not found: {folder} (pass a folder holding train_32x32.mat and test_32x32.mat "
                        f"with --source or {SOURCES['svhn'].env}=PATH)")
    missing = [name for name, _ in SVHN_SPLITS.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: not an SVHN folder, missing {missing[0]} (expected train_32x32.mat and "
                        f"test_32x32.mat; `extra` is not used)")
    return folder


def read_svhn_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One official cropped-digits .mat file -> uint8 (N, 3, 32, 32) images and int64 labels 0..9."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as e:  # scipy raises many types for damaged or non-MATLAB files
        detail = " ".join(str(e).split())[:200]
        raise DataError(f"{path}: unreadable SVHN .mat file ({e.__class__.__name__}: {detail}); the file is "
                        f"truncated or corrupt, fetch it again") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: wrong layout, variables {sorted(k for k in mat if not k.startswith('__'))} "
                        f"(expected 'X' and 'y')")
    x, y = mat["X"], np.asarray(mat["y"])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: X must be uint8 32x32x3xN, got {getattr(x, 'dtype', type(x).__name__)} "
                        f"{getattr(x, 'shape', None)}")
    if y.size != x.shape[3] or y.ndim > 2 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must hold {x.shape[3]} integer labels, got {y.dtype} {y.shape}")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"{path}: SVHN labels must lie in 1..10 (10 is digit 0), found "
                        f"{int(labels.min())}..{int(labels.max())}")
    return np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))), labels % 10


# --------------------------------------------------------------------------- prepare
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def prepare(source: str, out: Path, *, md5: str | None = None, train_limit: int | None = None,
            test_limit: int | None = None, expect_counts: list[int] | None = None,
            download_to: Path = Path("data/cifar-10-python.tar.gz"), dataset: str = recipe.DEFAULT_DATASET,
            extra: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The ``prepare`` stage: ``dataset`` from ``source`` -> ``out/<dataset>.safetensors`` + ``out/meta.json``,
    and each (dataset, source) of ``extra`` -> ``out/<dataset>/`` (same limits; official counts expected
    when ``expect_counts`` is given). Returns the main dataset's meta."""
    parts = {"": read_dataset(dataset, source, md5, Path(download_to), train_limit, test_limit, expect_counts)}
    for name, src in extra:
        if name == dataset or name in parts:
            continue
        counts = list(recipe.OFFICIAL_COUNTS[name]) if expect_counts is not None else None
        cache = Path(download_to).parent / Path(SOURCES[name].cache).name
        parts[name] = read_dataset(name, src, None, cache, train_limit, test_limit, counts)
    _write_folder_atomically(Path(out), parts)
    return parts[""][1]


def read_dataset(dataset: str, source: str, md5: str | None, download_to: Path, train_limit: int | None,
                 test_limit: int | None, expect_counts: list[int] | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One dataset's arrays (limits applied) and meta.json record, every check done."""
    if dataset not in recipe.DATASETS:
        raise DataError(f"unknown dataset {dataset!r} (one of {list(recipe.DATASETS)})")
    official = SOURCES[dataset]
    if is_url(source) and md5 is None and source == official.url:
        md5 = official.md5
    if dataset == "svhn":
        local = obtain_svhn(source, download_to)
        file_md5 = {name: calculate_md5(local / name) for name, _ in SVHN_SPLITS.values()}
        (x_train, y_train), (x_test, y_test) = (read_svhn_split(local / SVHN_SPLITS[s][0]) for s in ("train", "test"))
        _check_all_classes(y_train, recipe.NUM_CLASSES[dataset])
        _check_all_classes(y_test, recipe.NUM_CLASSES[dataset], "test")
        classes, pinned, size = list(SVHN_CLASSES), dict(SVHN_SPLITS.values()), sum(
            (local / n).stat().st_size for n in file_md5)
        source_md5 = folder_md5(file_md5)
    else:
        lay = CIFAR_LAYOUTS[dataset]
        local = obtain_archive(source, md5, download_to)
        source_md5, size = calculate_md5(local), local.stat().st_size
        members = read_members(local, lay)
        x_train, y_train, x_test, y_test, classes = parse_cifar(members, lay)
        file_md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in sorted(members.items())}
        pinned = OFFICIAL_FILE_MD5 if dataset == "cifar10" else lay.file_md5
    full = [int(y_train.size), int(y_test.size)]
    if expect_counts is not None and full != list(expect_counts):
        raise DataError(f"{local}: {full[0]} train / {full[1]} test images, expected "
                        f"{expect_counts[0]} / {expect_counts[1]} (set data.expect_counts: null for a partial archive)")
    x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    x_test, y_test = x_test[:test_limit], y_test[:test_limit]
    n_classes = recipe.NUM_CLASSES[dataset]
    meta = {  # file names, never machine paths: this record travels into published results
        "dataset": dataset,
        "num_classes": n_classes,
        "source": source if is_url(source) else Path(source).name,
        "archive": Path(local).name,
        "archive_md5": source_md5,
        "archive_bytes": size,
        "files_md5": file_md5,
        "official": all(file_md5.get(n) == pinned[n] for n in pinned),
        "counts_in_archive": {"train": full[0], "test": full[1]},
        "counts": {"train": int(y_train.size), "test": int(y_test.size)},
        "limits": {"train": train_limit, "test": test_limit},
        "classes": list(classes),
        "class_counts": {"train": np.bincount(y_train, minlength=n_classes).tolist(),
                         "test": np.bincount(y_test, minlength=n_classes).tolist()},
        "layout": {"images": "uint8 N x 3 x 32 x 32 (RGB planes)", "labels": "int64"},
        "paper_repro_version": __version__,
    }
    arrays = {"x_train": np.ascontiguousarray(x_train), "y_train": y_train,
              "x_test": np.ascontiguousarray(x_test), "y_test": y_test}
    return arrays, meta


def folder_md5(file_md5: dict[str, str]) -> str:
    """One identity for a multi-file source (SVHN's two .mat files): the md5 of its sorted 'name md5' lines."""
    return hashlib.md5("".join(f"{n} {m}\n" for n, m in sorted(file_md5.items())).encode()).hexdigest()


def source_md5(dataset: str, path: str | Path) -> str:
    """The ``archive_md5`` that ``prepare`` records for a local source of ``dataset``."""
    if dataset == "svhn":
        return folder_md5({name: calculate_md5(Path(path) / name) for name, _ in SVHN_SPLITS.values()})
    return calculate_md5(path)


def _write_folder_atomically(out: Path, parts: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]) -> None:
    """Build the folder (main dataset at "", others in subfolders) under a temp name and swap it in, so a
    failure leaves the old one untouched (a kill between the swap's two renames is undone by recover_swap)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for sub, (arrays, meta) in parts.items():
            folder = tmp / sub if sub else tmp
            folder.mkdir(exist_ok=True)
            name = arrays_file(meta["dataset"])
            save_file(arrays, str(folder / name))
            os.chmod(folder / name, 0o644)
            (folder / META_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def recover_swap(out: Path) -> None:
    """A prepare killed between moving the old folder aside and moving the new one in leaves no ``out`` but
    a whole ``.<name>.old-<pid>``: put it back (a whole folder is one with its meta.json)."""
    if out.exists():
        return
    aside = sorted(p for p in out.parent.glob(f".{out.name}.old-*") if (p / META_JSON).is_file())
    if aside:
        os.replace(aside[-1], out)
        print(f"prepare: restored {out} from {aside[-1].name}, left by an interrupted prepare", flush=True)


def load_prepared(folder: str | Path, dataset: str | None = None) -> Prepared:
    """Load ``data/prepared/`` (no unpickling), or its ``<dataset>/`` subfolder when ``dataset`` is not the
    one prepared at the top; a clear error when it is missing. ``dataset`` None: whatever is at the top."""
    folder = Path(folder)
    recover_swap(folder)
    meta_path = folder / META_JSON
    if not meta_path.is_file():
        raise DataError(f"{folder}: no prepared data (run `python -m paper_repro prepare` first)")
    meta = json.loads(meta_path.read_text())
    if dataset is not None and dataset_of(meta) != dataset:
        sub = folder / dataset
        if not (sub / META_JSON).is_file():
            raise DataError(f"{folder}: holds {dataset_of(meta)}, not {dataset} (an experiment names dataset "
                            f"{dataset}: run `python -m paper_repro prepare` to prepare it into {sub})")
        folder, meta = sub, json.loads((sub / META_JSON).read_text())
    arrays_path = folder / arrays_file(dataset_of(meta))
    if not arrays_path.is_file():
        raise DataError(f"{folder}: no prepared data (run `python -m paper_repro prepare` first)")
    arrays = load_file(str(arrays_path))
    return Prepared(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], meta)


def validation_split(n_train: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded hold-out of ``val_size`` training images for model selection (never the test set)."""
    if not 0 <= val_size < n_train:
        raise DataError(f"val_size {val_size} must be smaller than the {n_train} training images")
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[val_size:]), np.sort(order[:val_size])


def provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """The data facts every downstream artifact repeats."""
    return {"dataset": dataset_of(meta), "num_classes": int(meta.get("num_classes", recipe.NUM_CLASSES[dataset_of(meta)])),
            "official": bool(meta.get("official")), "archive_md5": meta.get("archive_md5"),
            "source": meta.get("source"), "n_train": meta.get("counts", {}).get("train"),
            "n_test": meta.get("counts", {}).get("test")}
