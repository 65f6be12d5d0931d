"""Tiny CIFAR-10 archives in the official python layout, built inside the tests (no downloads)."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def batch_bytes(images: np.ndarray, labels: list[int], label: str = "batch") -> bytes:
    return pickle.dumps({"batch_label": label, "labels": list(labels), "data": images,
                         "filenames": [f"img_{i}.png" for i in range(len(labels))]}, protocol=2)


def class_pattern_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Images whose class is visible (a per-class colour offset plus noise), so tiny models can learn it."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 90, size=(len(labels), 3, 32, 32))
    colour = np.stack([(labels * 37) % 160, (labels * 71) % 160, (labels * 113) % 160], axis=1)
    return (base + colour[:, :, None, None]).clip(0, 255).astype(np.uint8).reshape(len(labels), -1)


def make_files(per_class_train: int = 3, per_class_test: int = 2, seed: int = 0) -> dict[str, bytes]:
    """name -> file bytes for a valid archive: 5 training batches and one test batch."""
    files = {}
    for b in range(5):
        labels = np.repeat(np.arange(10), per_class_train)
        files[f"data_batch_{b + 1}"] = batch_bytes(class_pattern_images(labels, seed + b), labels.tolist())
    labels = np.repeat(np.arange(10), per_class_test)
    files["test_batch"] = batch_bytes(class_pattern_images(labels, seed + 99), labels.tolist())
    files["batches.meta"] = pickle.dumps({"label_names": CLASSES, "num_cases_per_batch": 30, "num_vis": 3072},
                                         protocol=2)
    return files


def write_archive(path: Path, files: dict[str, bytes], prefix: str = "cifar-10-batches-py/",
                  extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def make_archive(path: Path, per_class_train: int = 3, per_class_test: int = 2, seed: int = 0) -> Path:
    return write_archive(path, make_files(per_class_train, per_class_test, seed))


# --------------------------------------------------------------------------- CIFAR-100 and SVHN
def make_cifar100_files(per_class_train: int = 1, per_class_test: int = 1, seed: int = 0) -> dict[str, bytes]:
    """name -> bytes of a valid CIFAR-100 python archive: 'train', 'test', 'meta' with fine and coarse labels."""
    def split(per_class: int, s: int, label: str) -> bytes:
        fine = np.repeat(np.arange(100), per_class)
        return pickle.dumps({"batch_label": label, "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                             "data": class_pattern_images(fine, s), "filenames": [f"img_{i}.png" for i in range(len(fine))]},
                            protocol=2)
    return {"train": split(per_class_train, seed, "training batch 1 of 1"),
            "test": split(per_class_test, seed + 99, "testing batch 1 of 1"),
            "meta": pickle.dumps({"fine_label_names": [f"fine_{i}" for i in range(100)],
                                  "coarse_label_names": [f"coarse_{i}" for i in range(20)]}, protocol=2)}


def make_cifar100_archive(path: Path, per_class_train: int = 1, per_class_test: int = 1, seed: int = 0) -> Path:
    return write_archive(path, make_cifar100_files(per_class_train, per_class_test, seed), prefix="cifar-100-python/")


def svhn_arrays(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """The official .mat layout: X uint8 (32, 32, 3, N), y uint8 (N, 1) with digit 0 stored as 10."""
    images = class_pattern_images(labels, seed).reshape(len(labels), 3, 32, 32)
    return {"X": np.ascontiguousarray(np.transpose(images, (2, 3, 1, 0))),
            "y": np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)}


def make_svhn_folder(folder: Path, per_class_train: int = 3, per_class_test: int = 2, seed: int = 0,
                     train: dict | None = None, test: dict | None = None) -> Path:
    """train_32x32.mat and test_32x32.mat written with scipy.io.savemat (MATLAB 5, as the official files)."""
    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(folder / "train_32x32.mat", train if train is not None else
                     svhn_arrays(np.repeat(np.arange(10), per_class_train), seed))
    scipy.io.savemat(folder / "test_32x32.mat", test if test is not None else
                     svhn_arrays(np.repeat(np.arange(10), per_class_test), seed + 99))
    return folder
