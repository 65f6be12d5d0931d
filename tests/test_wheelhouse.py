"""`wheelhouse`: the closure it fetches follows the lock's pins, the target's markers and the extras asked for,
leaves out what the target has, and its pip calls (faked here: no network at test time) fall back to a local
build only for pure-Python sources."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import zipfile
from pathlib import Path

import pytest

from paper_repro import cli, wheelhouse as W
from paper_repro.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# name -> Requires-Dist lines of a small, made-up package index
INDEX = {
    "app": ["lib-a>=1", "Lib_B[fast]", "old-backport; python_version < '3.12'", "winonly; sys_platform == 'win32'",
            "docs-tool; extra == 'docs'"],
    "lib-a": ["numpy"],
    "lib-b": ["speedup; extra == 'fast'", "six"],
    "speedup": [],
    "six": [],
    "numpy": [],
    "old-backport": [],
    "winonly": [],
    "docs-tool": [],
    "big-gpu-lib": ["cuda-runtime"],
    "cuda-runtime": [],
}
PINS = {name: "1.0" for name in INDEX}


def fake_requires(level: dict[str, str]) -> dict[str, list[str]]:
    assert all(PINS[n] == v for n, v in level.items()), "asked for a version other than the lock's pin"
    return {name: INDEX[name] for name in level}


def test_the_closure_follows_markers_of_the_target_and_the_extras_asked_for():
    on_311 = W.closure(["app"], PINS, fake_requires, set(), W.target_environment("3.11"))
    assert set(on_311.pins) == {"app", "lib-a", "lib-b", "speedup", "six", "numpy", "old-backport"}
    on_312 = W.closure(["app"], PINS, fake_requires, set(), W.target_environment("3.12"))
    assert "old-backport" not in on_312.pins and "winonly" not in on_312.pins and "docs-tool" not in on_312.pins
    with_docs = W.closure(["app[docs]"], PINS, fake_requires, set(), W.target_environment("3.12"))
    assert "docs-tool" in with_docs.pins
    without_extra = W.closure(["lib-b"], PINS, fake_requires, set(), W.target_environment("3.12"))
    assert set(without_extra.pins) == {"lib-b", "six"}


def test_an_extra_asked_for_later_expands_a_package_again():
    index = {**INDEX, "first": ["lib-b"], "second": ["lib-b[fast]"], "top": ["first", "second"]}
    result = W.closure(["top"], {n: "1.0" for n in index}, lambda level: {n: index[n] for n in level}, set(),
                       W.target_environment("3.12"))
    assert "speedup" in result.pins


def test_what_the_target_has_is_left_out_with_what_only_it_needs():
    result = W.closure(["app", "big-gpu-lib"], PINS, fake_requires, {"numpy", "big-gpu-lib"},
                       W.target_environment("3.12"))
    assert "numpy" not in result.pins and "big-gpu-lib" not in result.pins
    assert "cuda-runtime" not in result.pins  # reached only through what the target has
    assert sorted(result.left_out) == ["big-gpu-lib", "numpy"]


def test_a_dependency_without_a_pin_is_an_error_naming_who_needs_it():
    pins = {n: v for n, v in PINS.items() if n != "six"}
    with pytest.raises(ConfigError, match=r"six \(required by lib-b==1.0\) has no pin in the lock"):
        W.closure(["app"], pins, fake_requires, set(), W.target_environment("3.12"))


def test_the_lock_is_read_by_canonical_name():
    pins = W.read_lock(ROOT / "requirements.lock")
    assert pins["torch"] == "2.14.1" and "antlr4-python3-runtime" in pins and "gitpython" in pins


def test_the_projects_real_closure_pins_every_package_and_leaves_the_torch_stack_out():
    """On the installed project: every package reached is pinned in the lock, the CUDA libraries are not reached
    when torch is left to the target, and what the pipeline imports (dvclive, dvc, torchattacks) is fetched."""
    pins = W.read_lock(ROOT / "requirements.lock")

    def installed(level: dict[str, str]) -> dict[str, list[str]]:
        for name, version in level.items():
            assert importlib.metadata.version(name) == version, f"{name}: .venv differs from the lock"
        return {name: importlib.metadata.requires(name) or [] for name in level}

    have = {*W.TORCH_STACK, *W.INSTALLER}
    result = W.closure(W.project_requirements(), pins, installed, have, W.target_environment("3.11"))
    assert {"dvclive", "dvc", "torchattacks", "safetensors", "submitit", "pydantic"} <= set(result.pins)
    from packaging.requirements import Requirement
    cuda_libraries = {W.canonical(Requirement(r).name) for r in importlib.metadata.requires("torch")
                      if r.startswith(("nvidia-", "cuda-"))}
    assert len(cuda_libraries) > 5 and not cuda_libraries & set(result.pins)
    assert not set(W.TORCH_STACK) & set(result.pins)
    assert {"torch", "torchvision"} <= set(result.left_out)


def make_wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    metadata = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}\n".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", metadata)
    return path


def test_requirements_are_read_from_the_wheels_metadata(tmp_path):
    wheel = make_wheel(tmp_path, "lib-b", "1.0", ["six", "speedup; extra == 'fast'"])
    assert W.wheel_requires(wheel) == ["six", "speedup; extra == 'fast'"]
    assert W.wheel_name(wheel) == "lib-b" and W.pure_python(wheel)
    assert not W.pure_python(tmp_path / "numpy-1.0-cp312-cp312-manylinux_2_28_x86_64.whl")
    broken = tmp_path / "broken-1.0-py3-none-any.whl"
    zipfile.ZipFile(broken, "w").close()
    with pytest.raises(ConfigError, match="no .dist-info/METADATA"):
        W.wheel_requires(broken)


class FakePip:
    """pip with an index of made-up wheels: `no_wheel` names have only sources, which build to `built_tag`."""

    def __init__(self, no_wheel: set[str], built_tag: str = "py3-none-any"):
        self.no_wheel, self.built_tag, self.calls = no_wheel, built_tag, []

    def __call__(self, *args: str):
        self.calls.append(args)
        specs = [a for a in args if "==" in a]
        if args[0] == "download":
            dest = Path(args[args.index("--dest") + 1])
            assert "--no-deps" in args and "--only-binary=:all:" in args and args[args.index("--python-version") + 1]
            if any(s.split("==")[0] in self.no_wheel for s in specs):
                return Result(1, "ERROR: No matching distribution found")
            for spec in specs:
                name, version = spec.split("==")
                make_wheel(dest, name, version, INDEX[name], "cp312-cp312-manylinux_2_28_x86_64")
            return Result(0, "")
        dest = Path(args[args.index("--wheel-dir") + 1])
        name, version = specs[0].split("==")
        make_wheel(dest, name, version, INDEX[name], self.built_tag)
        return Result(0, "")


class Result:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


def test_a_source_only_package_is_built_here_when_pure_python(tmp_path, monkeypatch):
    pip = FakePip(no_wheel={"six"})
    monkeypatch.setattr(W.Downloader, "pip", lambda self, *args: pip(*args))
    lock = tmp_path / "requirements.lock"
    lock.write_text("".join(f"{n}=={v}\n" for n, v in PINS.items()))
    out = tmp_path / "wheels"
    manifest = W.build_wheelhouse(out, lock, ["app"], {"numpy"}, "3.12", quiet=True)

    assert manifest["built_here_pure_python"] == ["six-1.0-py3-none-any.whl"]
    assert manifest["left_to_the_target"] == ["numpy"] and manifest["python"] == "3.12"
    assert sorted(W.wheel_name(out / f) for f in manifest["files"]) == ["app", "lib-a", "lib-b", "six", "speedup"]
    for name, digest in manifest["files"].items():
        assert hashlib.md5((out / name).read_bytes()).hexdigest() == digest
    assert json.loads((out / W.MANIFEST).read_text()) == manifest
    assert (out / "requirements.txt").read_text().splitlines() == [
        "app==1.0", "lib-a==1.0", "lib-b==1.0", "six==1.0", "speedup==1.0"]
    downloads = [c for c in pip.calls if c[0] == "download"]
    assert len(downloads) <= 6, "each level should download in one pip call, one by one only after a failure"

    calls = len(pip.calls)
    again = W.build_wheelhouse(out, lock, ["app"], {"numpy"}, "3.12", quiet=True)  # all present: no pip call
    assert again["files"] == manifest["files"] and len(pip.calls) == calls


def test_a_source_that_builds_only_a_platform_wheel_is_refused(tmp_path, monkeypatch):
    pip = FakePip(no_wheel={"six"}, built_tag="cp311-cp311-linux_x86_64")
    monkeypatch.setattr(W.Downloader, "pip", lambda self, *args: pip(*args))
    with pytest.raises(ConfigError, match="six==1.0 has no wheel for Python 3.12.*build it on the target"):
        W.Downloader(tmp_path, "3.12").fetch("six", "1.0")
    assert not list(tmp_path.glob("six-*"))


@pytest.mark.parametrize("argv, message", [
    (["--python", "312"], "give the target's Python as X.Y"),
    (["--lock", "no-such.lock"], "no such file"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    assert cli.main(["wheelhouse", "--out", str(tmp_path / "w"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_roots_follow_the_target_markers_and_pins_must_satisfy_what_requires_them():
    result = W.closure(["six", "winonly; sys_platform == 'win32'", "docs-tool; extra == 'docs'"], PINS, fake_requires,
                       set(), W.target_environment("3.12"))
    assert set(result.pins) == {"six"}
    with pytest.raises(ConfigError, match=r"numpy==1.0 \(the lock's pin\) does not satisfy numpy>=2"):
        W.closure(["numpy>=2"], PINS, fake_requires, set(), W.target_environment("3.12"))
    with pytest.raises(ConfigError, match="not a requirement"):
        W.closure(["six ==="], PINS, fake_requires, set(), W.target_environment("3.12"))


def test_a_wheel_left_for_another_python_is_not_taken_for_the_target(tmp_path):
    make_wheel(tmp_path, "numpy", "1.0", [], "cp311-cp311-manylinux_2_17_x86_64")
    make_wheel(tmp_path, "six", "1.0", [], "py3-none-any")
    on_312 = W.Downloader(tmp_path, "3.12")
    assert on_312.find("numpy", "1.0") is None and on_312.find("six", "1.0") is not None
    assert W.Downloader(tmp_path, "3.11").find("numpy", "1.0") is not None
