"""Getting a dataset: where it comes from (``--source``, its environment variable, the cached copy or the
official URL) and a local, checksum-verified copy of it, downloaded with retries when it is a URL.

Why: a download fails or arrives damaged more often than anything else in the pipeline, so a transfer
lands under a temp name and appears only when complete and verified, and a local file with the wrong
md5 is refused with what to do. What the files hold and how they are read lives in archives.py.
"""
from __future__ import annotations

import http.client
import os
import shutil
import time
import urllib.error
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets import CIFAR100, SVHN
from torchvision.datasets.utils import calculate_md5, download_url

from . import archives
from .archives import DataError
from .config import ARCHIVE_ENV, OFFICIAL_MD5, OFFICIAL_URL, DataSettings

SVHN_URL = SVHN.split_list["train"][0].rsplit("/", 1)[0] + "/"
DOWNLOAD_RETRIES = 3
DOWNLOAD_BACKOFF_S = 2.0  # seconds, times the attempt number


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


def obtain_svhn(source: str, download_to: Path) -> Path:
    """The folder holding train_32x32.mat and test_32x32.mat; from the official URL, downloaded and checked."""
    if is_url(source):
        base = source if source.endswith("/") else source + "/"
        for name, md5 in archives.SVHN_SPLITS.values():
            download(base + name, md5, Path(download_to) / name)
        return Path(download_to)
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise DataError(f"SVHN folder not found: {folder} (pass a folder holding train_32x32.mat and test_32x32.mat "
                        f"with --source or {SOURCES['svhn'].env}=PATH)")
    missing = [name for name, _ in archives.SVHN_SPLITS.values() if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{folder}: not an SVHN folder, missing {missing[0]} (expected train_32x32.mat and "
                        f"test_32x32.mat; `extra` is not used)")
    return folder
