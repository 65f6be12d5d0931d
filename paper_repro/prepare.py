"""``prepare``: the profile's dataset (official URL, or a local copy) -> data/prepared/, and every other
dataset an experiment names -> data/prepared/<dataset>/."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import config
from .data import prepare, source_md5
from .fetch import is_url, resolve_extra_source, resolve_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="archive path or URL of data.dataset (default: $CIFAR10_ARCHIVE for CIFAR-10, "
                                    "$CIFAR100_ARCHIVE, $SVHN_DIR (a folder with train_32x32.mat and test_32x32.mat); "
                                    "then data.archive if present, then the official URL)")
    p.add_argument("--md5", help="expected md5 of the archive (the official URL's md5 is known)")
    p.add_argument("--out", type=Path, help="output folder (default: data.prepared)")
    p.add_argument("--train-limit", type=int, help="keep the first N training images (default: data.train_limit)")
    p.add_argument("--test-limit", type=int, help="keep the first N test images (default: data.test_limit)")
    p.add_argument("--any-size", action="store_true", help="accept archives that are not the official sizes")
    p.add_argument("--stale-check", action="store_true",
                   help="only check: exit 1 when the prepared data came from another archive than the one that "
                        "would be used now (DVC cannot see $CIFAR10_ARCHIVE), else 0")


def main(args: argparse.Namespace) -> int:
    settings = config.load(args.params, args.overrides) if args.params.is_file() else config.from_dict({})
    data = settings.data
    source = resolve_source(args.source, data)
    if args.stale_check:
        return stale(source, args.out or Path(data.prepared), data.dataset)
    md5 = args.md5 or (data.md5 if source == data.url else None)
    extra = [(d, resolve_extra_source(d, data)) for d in other_datasets(settings)]
    meta = prepare(
        source, args.out or Path(data.prepared), md5=md5,
        train_limit=args.train_limit if args.train_limit is not None else data.train_limit,
        test_limit=args.test_limit if args.test_limit is not None else data.test_limit,
        expect_counts=None if args.any_size else data.expect_counts,
        download_to=Path(data.archive), dataset=data.dataset, extra=extra)
    summary = {k: meta[k] for k in ("dataset", "source", "archive_md5", "official", "counts")}
    print(json.dumps({**summary, "also": [d for d, _ in extra]}))
    return 0


def other_datasets(settings: config.Settings) -> list[str]:
    """Datasets named by experiments that are not the profile's (prepared into subfolders), in first-use order."""
    seen: list[str] = []
    for e in settings.experiments:
        if e.dataset not in (None, settings.data.dataset) and e.dataset not in seen:
            seen.append(e.dataset)
    return seen


def stale(source: str, prepared: Path, dataset: str = "cifar10") -> int:
    """1 when ``prepared`` exists but was made from a different local archive than ``source``."""
    meta_path = prepared / "meta.json"
    if is_url(source) or not meta_path.is_file() or not Path(source).exists():
        return 0
    recorded = json.loads(meta_path.read_text()).get("archive_md5")
    current = source_md5(dataset, source)
    if recorded != current:
        print(f"{prepared} was prepared from an archive with md5 {recorded}; {source} has md5 {current}")
        return 1
    return 0
