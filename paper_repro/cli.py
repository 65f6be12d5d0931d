"""Thin command line: ``python -m paper_repro <command>``; each command lives in its own module."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path

from . import __version__
from .config import ARCHIVE_ENV

# command -> (module, one-line help). Each module offers add_arguments(parser) and main(args) -> int.
COMMANDS = {
    "prepare": ("paper_repro.prepare", "verify and convert a CIFAR-10 archive into data/prepared/"),
    "train": ("paper_repro.train", "train one experiment of params.yaml into runs/<name>/"),
    "train-stacked": ("paper_repro.train_stacked", "train several experiments that share a data pass as one stacked "
                                                   "network, each into runs/<name>/ as train writes it"),
    "evaluate": ("paper_repro.evaluate", "evaluate one trained run into metrics/<name>.json"),
    "verify": ("paper_repro.verify", "check reported numbers and claims against metrics/"),
    "report": ("paper_repro.report", "execute the notebooks (papermill) into reports/ with HTML copies"),
    "publish": ("paper_repro.publish", "write the committed bundle results/<profile>/ (or the README results block)"),
    "grid": ("paper_repro.grid", "train and evaluate every out-of-date experiment as parallel jobs, then dvc commit"),
    "bench": ("paper_repro.bench", "time training steps: our loop versus a plain baseline loop"),
    "params": ("paper_repro.params", "check or write out every setting a params.yaml leaves to a code default"),
    "gpu-check": ("paper_repro.gpu_check", "everything that needs CUDA in one timed, fail-soft run: report to --out DIR"),
    "wheelhouse": ("paper_repro.wheelhouse", "download the pinned wheels a machine without network needs beside its "
                                             "own torch (for another Python/platform)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the module of ``command`` (the one being run) is imported, keeping --help fast."""
    parser = argparse.ArgumentParser(
        prog="python -m paper_repro",
        description="Binary-Relax quantization of adversarially trained EnResNets (Li, Wang, Xin; LOD 2021). "
                    f"Offline: set {ARCHIVE_ENV}=PATH to a local cifar-10-python.tar.gz.")
    parser.add_argument("--version", action="version", version=f"paper_repro {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file (default: params.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set train.epochs=2 (repeatable)")
        p.add_argument("--quiet", action="store_true", default=bool(os.environ.get("CI")),
                       help="no progress bars (default when CI is set)")
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


#: Failures a user can act on: one line "error: ..." and exit 2 (the message names the file and what to do).
#: Looked up in sys.modules, so that the cli imports no heavy module (an error's module is loaded when raised).
ANTICIPATED = {"paper_repro.config": "ConfigError", "paper_repro.data": "DataError",
               "paper_repro.metrics_schema": "MetricsError", "paper_repro.checkpoint": "CheckpointError",
               "paper_repro.claims": "RegistryError", "paper_repro.zoo": "ZooError",
               "paper_repro.report": "ReportError"}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def anticipated() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[m], name) for m, name in ANTICIPATED.items() if m in sys.modules)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised unless anticipated
        if isinstance(e, anticipated()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            where = f" writing {e.filename}" if e.filename else ""
            print(f"error: disk full{where}: free space and rerun `{args.command}` (written files are whole: every "
                  f"write is atomic, and training resumes with --resume)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
