"""``params``: every profile's params.yaml writes out the complete settings in effect (issue 12).

Why: DVC tracks the values in params files, not the defaults in code. A file that left a setting to a
code default would hide it from ``dvc params diff``, from the dvc.lock records and from a reader, and a
default changed in config.py or recipe.py would change a run without a params diff. So each profile
file holds every setting; people still edit it by hand (with comments), and this command keeps it whole:

- ``python -m paper_repro params --check --all`` lists every setting a file leaves to the code (exit 1);
  tests/test_params_files.py runs it on the committed profiles, so a new setting or a removed key fails CI;
- ``python -m paper_repro params --write --all`` (``make params``) fills those settings in, in place, with the
  code's values: a ruamel.yaml round trip keeps the comments, the key order and the flow style, and the
  written file must load to exactly the settings it loaded to before (otherwise nothing is written).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from . import atomic, config

#: The profile files of the repository: the paper profile at the root and profiles/<name>/params.yaml.
ROOT_PARAMS = Path("params.yaml")
PROFILE_GLOB = "profiles/*/params.yaml"


class ParamsDrift(ValueError):
    """A write would change the settings a file loads to (a bug in the filler): nothing was written."""


def profile_files(root: Path = Path(".")) -> list[Path]:
    return [root / ROOT_PARAMS, *sorted(root.glob(PROFILE_GLOB))]


def resolved(settings: config.Settings) -> dict[str, Any]:
    """The settings in effect as params.yaml writes them (experiments as a mapping name -> settings)."""
    out = config.to_dict(settings)
    out["experiments"] = {e.pop("name"): e for e in out["experiments"]}
    for experiment in settings.experiments:  # the loss weights and quantizer options in effect, defaults included
        written = out["experiments"][experiment.name]
        written["loss_params"] = experiment.resolved_loss_params()
        written["quantizer_options"] = config.quantizer_options(experiment.quantizer, experiment.quantizer_options)
    return out


def missing_keys(written: Any, full: Any, at: str = "") -> list[str]:
    """Dotted keys of ``full`` that ``written`` (the file's mapping) leaves out, at any depth of nested
    mappings (a list is a value: written whole or not at all)."""
    if not isinstance(full, dict) or not isinstance(written, dict):
        return []
    out = []
    for key, value in full.items():
        where = f"{at}.{key}" if at else str(key)
        if key not in written:
            out.append(where)
        else:
            out.extend(missing_keys(written[key], value, where))
    return out


def _node(value: Any, flow: bool) -> Any:
    """A plain value as a ruamel node: mappings and lists in flow style where the parent is (or for lists)."""
    if isinstance(value, dict):
        node = CommentedMap((k, _node(v, True)) for k, v in value.items())
        if flow:
            node.fa.set_flow_style()
        return node
    if isinstance(value, list):
        seq = CommentedSeq(_node(v, True) for v in value)
        seq.fa.set_flow_style()
        return seq
    return value


def fill(written: CommentedMap, full: dict[str, Any]) -> list[str]:
    """Insert into ``written`` every key of ``full`` it lacks, each at its place in ``full``'s order (after the
    keys before it), recursively; returns the dotted keys added. Existing values are never touched."""
    added: list[str] = []

    def walk(node: CommentedMap, want: dict[str, Any], at: str) -> None:
        flow = node.fa.flow_style()
        for index, (key, value) in enumerate(want.items()):
            where = f"{at}.{key}" if at else str(key)
            if key in node:
                if isinstance(value, dict) and isinstance(node[key], CommentedMap):
                    walk(node[key], value, where)
                continue
            before = [k for k in list(want)[:index] if k in node]
            position = list(node).index(before[-1]) + 1 if before else 0
            node.insert(position, key, _node(value, flow))
            added.append(where)

    walk(written, full, "")
    return added


def _yaml() -> YAML:
    y = YAML()  # round trip: comments, order and styles survive
    y.width = 4096  # one experiment per line, as the files write them
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def check(path: Path) -> list[str]:
    """The settings ``path`` leaves to a code default (empty: the file is complete)."""
    full = resolved(config.load(path))  # first: a missing or invalid file is a one-line ConfigError
    written = config.experiments_as_list(config.parse_yaml(path.read_text()) or {})
    written["experiments"] = {e["name"]: e for e in written.get("experiments") or []}
    return missing_keys(written, full)


def write(path: Path) -> list[str]:
    """Fill ``path`` in place (see :func:`fill`); the keys added. Raises ParamsDrift, writing nothing, when the
    filled file would load to other settings than the file did."""
    before = resolved(config.load(path))
    y = _yaml()
    document = y.load(path.read_text())
    added = fill(document, before)
    if not added:
        return []
    buffer = io.StringIO()
    y.dump(document, buffer)
    text = buffer.getvalue()
    after = resolved(config.from_dict(config.parse_yaml(text), origin=str(path)))
    if after != before:
        raise ParamsDrift(f"{path}: filling in {added} would change the settings in effect; nothing written")
    atomic.write_text(path, text)
    return added


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true",
                      help="list every setting the file leaves to a code default; exit 1 if any")
    what.add_argument("--write", action="store_true",
                      help="write those settings into the file with the code's values (comments and order kept)")
    p.add_argument("--all", action="store_true",
                   help=f"every profile file ({ROOT_PARAMS} and {PROFILE_GLOB}) instead of --params")


def main(args: argparse.Namespace) -> int:
    if args.overrides:
        raise config.ConfigError("params checks and writes the files themselves: --set does not apply")
    paths = profile_files() if args.all else [args.params]
    incomplete = 0
    for path in paths:
        keys = write(path) if args.write else check(path)
        if args.write:
            print(f"{path}: {'wrote ' + str(len(keys)) + ' setting(s): ' + ', '.join(keys) if keys else 'complete'}")
        elif keys:
            incomplete += 1
            print(f"{path}: {len(keys)} setting(s) left to code defaults: {', '.join(keys)} "
                  f"(`python -m paper_repro params --write` writes them)")
        else:
            print(f"{path}: complete")
    return 1 if incomplete else 0
