"""Each DVC stage depends on exactly the package modules its command imports (issue 12): derived from
the import graph, for the root dvc.yaml and every profile's copy. A stage whose code changes must rerun;
a module it does not import must not rerun it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from paper_repro import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "paper_repro"
ENTRY = ("paper_repro", "paper_repro.__main__", "paper_repro.cli")  # what `python -m paper_repro X` runs first


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def direct_imports(name: str, mods: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in a module (top level or inside functions)."""
    path = mods[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in mods else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in mods}


def closure(start: str, mods: dict[str, Path]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for m in direct_imports(todo.pop(), mods) - seen:
            seen.add(m)
            todo.append(m)
    return seen


def notebook_imports() -> set[str]:
    """Package modules the notebooks import (the report stage executes them)."""
    import json

    found = set()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            for node in ast.walk(ast.parse("\n".join(l for l in source.splitlines() if not l.startswith(("%", "!"))))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paper_repro"):
                    found.add(node.module)
                    found.update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names if a.name.startswith("paper_repro"))
    return found


def expected_files(command: str) -> set[str]:
    """The .py files (relative to the repository) that `python -m paper_repro <command>` imports
    (for `report`, also what the notebooks it executes import)."""
    mods = modules()
    starts = {*ENTRY, cli.COMMANDS[command][0]}
    if command == "report":
        starts |= notebook_imports() & set(mods)
    names = set().union(*(closure(m, mods) for m in starts))
    return {str(mods[m].relative_to(ROOT)) for m in names}


def declared_files(deps: list[str], root: str) -> set[str]:
    """The .py files a stage's deps name (a folder dep stands for every .py file in it)."""
    out = set()
    for dep in deps:
        dep = dep.replace("${root}", root)
        path = (ROOT / dep).resolve() if root == "." else (ROOT / "profiles" / "x" / dep).resolve()
        if not str(path).startswith(str(PACKAGE)):
            continue
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        out.update(str(f.relative_to(ROOT)) for f in files if f.suffix == ".py")
    return out


def stage_commands(stage: dict) -> list[str]:
    cmd = (stage.get("do") or stage)["cmd"]
    words = cmd.split()
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "paper_repro" and words[i - 1] == "-m"]


PIPELINES = [(ROOT / "dvc.yaml", "."), *((p, "../..") for p in sorted((ROOT / "profiles").glob("*/dvc.yaml")))]


@pytest.mark.parametrize("path, root", PIPELINES, ids=[str(p.relative_to(ROOT)) for p, _ in PIPELINES])
def test_stage_code_deps_are_the_import_graph(path: Path, root: str):
    stages = yaml.safe_load(path.read_text())["stages"]
    for name, stage in stages.items():
        commands = stage_commands(stage)
        assert commands, f"{path.name}: stage {name} runs no paper_repro command"
        want = set().union(*(expected_files(c) for c in commands))
        have = declared_files((stage.get("do") or stage).get("deps", []), root)
        assert have == want, (f"{path.relative_to(ROOT)}: stage {name}: missing {sorted(want - have)}, "
                              f"not imported {sorted(have - want)}")


def test_no_stage_module_imports_another_stage():
    mods = modules()
    stage_modules = {cli.COMMANDS[c][0] for c in ("prepare", "train", "evaluate", "verify", "report", "publish")
                     if c in cli.COMMANDS}
    for m in stage_modules:
        others = (closure(m, mods) - {m}) & stage_modules
        assert not others, f"{m} imports the stage module(s) {sorted(others)}"
