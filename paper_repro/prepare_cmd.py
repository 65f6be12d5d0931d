"""``prepare``: CIFAR-10 archive (official URL, or a local file) -> data/prepared/."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import config
from .data import prepare, resolve_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="archive path or URL (default: $CIFAR10_ARCHIVE, then data.archive if "
                                    "present, then the official URL)")
    p.add_argument("--md5", help="expected md5 of the archive (the official URL's md5 is known)")
    p.add_argument("--out", type=Path, help="output folder (default: data.prepared)")
    p.add_argument("--train-limit", type=int, help="keep the first N training images (default: data.train_limit)")
    p.add_argument("--test-limit", type=int, help="keep the first N test images (default: data.test_limit)")
    p.add_argument("--any-size", action="store_true", help="accept archives that are not 50,000/10,000 images")


def main(args: argparse.Namespace) -> int:
    settings = config.load(args.params, args.overrides) if args.params.is_file() else config.from_dict({})
    data = settings.data
    source = resolve_source(args.source, data)
    md5 = args.md5 or (data.md5 if source == data.url else None)
    meta = prepare(
        source, args.out or Path(data.prepared), md5=md5,
        train_limit=args.train_limit if args.train_limit is not None else data.train_limit,
        test_limit=args.test_limit if args.test_limit is not None else data.test_limit,
        expect_counts=None if args.any_size else data.expect_counts,
        download_to=Path(data.archive))
    summary = {k: meta[k] for k in ("source", "archive_md5", "official", "counts")}
    print(json.dumps(summary))
    return 0
