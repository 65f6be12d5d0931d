"""The datasets' files and reading them safely: the CIFAR-10/100 python archive layouts and SVHN's two
.mat files, with the per-file md5s torchvision pins, read in memory with every check done.

Why: the archive is the only input that comes from outside, so nothing in it is trusted. Nothing is
extracted to disk: every tar member is checked (no absolute or escaping paths, no links or devices, no
oversized batch) before the needed ones are read; the gzip stream is read to its end so its CRC is
checked; the pickled batches are loaded by an unpickler that allows only what a batch holds; shapes,
dtypes and labels are validated. SVHN's ``train_32x32.mat`` / ``test_32x32.mat`` are read with
scipy.io.loadmat (what torchvision uses; MATLAB files hold no code), digit 0 stored as label 10.
Fetching the files is fetch.py's job, the prepared artifact data.py's.
"""
from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100, SVHN

from . import recipe

ARCHIVE_DIR = "cifar-10-batches-py"
TRAIN_FILES = [name for name, _ in CIFAR10.train_list]
TEST_FILES = [name for name, _ in CIFAR10.test_list]
META_FILE = CIFAR10.meta["filename"]
# The per-file checksums torchvision pins for the official archive (paper-spec §9 lists the same).
OFFICIAL_FILE_MD5 = {**dict(CIFAR10.train_list), **dict(CIFAR10.test_list), META_FILE: CIFAR10.meta["md5"]}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SVHN_SPLITS = {split: (SVHN.split_list[split][1], SVHN.split_list[split][2]) for split in ("train", "test")}
SVHN_CLASSES = tuple(str(d) for d in range(10))


class DataError(RuntimeError):
    """Bad or unreachable input; the message is one line naming the problem and what to do."""


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
    check_all_classes(y_train, lay.num_classes)
    check_all_classes(y_test, lay.num_classes, "test")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    return x_train, y_train, x_test, y_test, classes


def check_all_classes(y: np.ndarray, num_classes: int, split: str = "training") -> None:
    present = np.unique(y)
    if present.size != num_classes:
        raise DataError(f"{split} batches hold {present.size} classes, expected {num_classes}")


# --------------------------------------------------------------------------- SVHN
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
