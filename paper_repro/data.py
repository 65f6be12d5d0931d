"""The training-ready artifact of CIFAR-10, CIFAR-100 and SVHN: ``prepare`` turns each dataset's verified
files into ``<dataset>.safetensors`` + ``meta.json`` (written atomically), and ``load_prepared``,
``validation_split`` and ``provenance`` serve it to training and evaluation.

Why this shape: the arrays land in one safetensors file that loads in milliseconds and never unpickles,
and ``meta.json`` records every check made on the input (archive md5, per-file md5s, counts, classes,
whether the data are the official ones); the output folder is swapped in only when complete.
Getting the files is fetch.py's job, reading them safely archives.py's.

The profile's dataset (``data.dataset``) is prepared into ``data.prepared``; every other dataset an
experiment names goes to ``data.prepared/<dataset>/``, inside the same DVC output.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file
from torchvision.datasets.utils import calculate_md5

from . import __version__, archives, fetch, recipe
from .archives import DataError

ARRAYS_FILE = "cifar10.safetensors"  # the CIFAR-10 arrays; other datasets: arrays_file(dataset)
META_JSON = "meta.json"


def arrays_file(dataset: str) -> str:
    return f"{dataset}.safetensors"


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
        cache = Path(download_to).parent / Path(fetch.SOURCES[name].cache).name
        parts[name] = read_dataset(name, src, None, cache, train_limit, test_limit, counts)
    _write_folder_atomically(Path(out), parts)
    return parts[""][1]


def read_dataset(dataset: str, source: str, md5: str | None, download_to: Path, train_limit: int | None,
                 test_limit: int | None, expect_counts: list[int] | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One dataset's arrays (limits applied) and meta.json record, every check done."""
    if dataset not in recipe.DATASETS:
        raise DataError(f"unknown dataset {dataset!r} (one of {list(recipe.DATASETS)})")
    official = fetch.SOURCES[dataset]
    if fetch.is_url(source) and md5 is None and source == official.url:
        md5 = official.md5
    if dataset == "svhn":
        local = fetch.obtain_svhn(source, download_to)
        file_md5 = {name: calculate_md5(local / name) for name, _ in archives.SVHN_SPLITS.values()}
        (x_train, y_train), (x_test, y_test) = (archives.read_svhn_split(local / archives.SVHN_SPLITS[s][0])
                                                for s in ("train", "test"))
        archives.check_all_classes(y_train, recipe.NUM_CLASSES[dataset])
        archives.check_all_classes(y_test, recipe.NUM_CLASSES[dataset], "test")
        classes, pinned, size = list(archives.SVHN_CLASSES), dict(archives.SVHN_SPLITS.values()), sum(
            (local / n).stat().st_size for n in file_md5)
        source_md5 = folder_md5(file_md5)
    else:
        lay = archives.CIFAR_LAYOUTS[dataset]
        local = fetch.obtain_archive(source, md5, download_to)
        source_md5, size = calculate_md5(local), local.stat().st_size
        members = archives.read_members(local, lay)
        x_train, y_train, x_test, y_test, classes = archives.parse_cifar(members, lay)
        file_md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in sorted(members.items())}
        pinned = archives.OFFICIAL_FILE_MD5 if dataset == "cifar10" else lay.file_md5
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
        "source": source if fetch.is_url(source) else Path(source).name,
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
        return folder_md5({name: calculate_md5(Path(path) / name) for name, _ in archives.SVHN_SPLITS.values()})
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
