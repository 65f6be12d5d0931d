"""``wheelhouse``: the pinned wheels a machine without network needs next to its own PyTorch.

GPU nodes and short-lived GPU machines often cannot reach PyPI but come with a CUDA build of torch. This
command, run where PyPI is reachable, downloads, for the target's Python and platform, exactly the
requirements.lock pins of the project's dependency closure, leaving out what the target already has (by
default the torch stack: torch, torchvision, triton and the CUDA libraries only they need), and writes ``requirements.txt`` and a
manifest (md5 of every file) beside them. The closure is followed through each wheel's own metadata,
with the target's markers and the extras asked for, so nothing the target does not need is fetched
(a torch dependency that nothing else needs is not). A pin the lock lacks is an error, never a silent
newer version. Sources without a wheel (antlr4-python3-runtime 4.9.3) are built locally and kept only
when the result is pure Python.

On the target, from the repository root (docs/gpu.md section 1)::

    python3 -m pip install --no-index --no-deps --find-links DIR -r DIR/requirements.txt --target /tmp/site
    PYTHONPATH=/tmp/site python3 -m paper_repro gpu-check --out reports/gpu-check
"""
from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, parse_wheel_filename
from tqdm.auto import tqdm

from . import atomic
from .config import ConfigError

#: What a machine that runs torch already has, unless --with-torch. Their CUDA libraries (nvidia-*, cuda-*) are
#: reached only through them, so the closure leaves those out too.
TORCH_STACK = ("torch", "torchvision", "triton")
#: The installer's own packages: every pip-managed Python has them and `pip freeze` (hence the lock) omits them.
INSTALLER = ("pip", "setuptools", "wheel")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64")
MANIFEST = "wheelhouse.json"


def canonical(name: str) -> str:
    """PEP 503 name: what pip, the lock and wheel file names agree on."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """canonical name -> pinned version, from ``name==version`` lines (hashes and comments ignored)."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    if not pins:
        raise ConfigError(f"{path}: no `name==version` pins found; is this a requirements lock?")
    return pins


def target_environment(python: str) -> dict[str, str]:
    """Marker variables of a CPython ``python`` (e.g. "3.12") on x86-64 Linux, whatever machine runs this."""
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", implementation_version=f"{python}.0",
               sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix", implementation_name="cpython",
               platform_python_implementation="CPython")
    return env


def parse(line: str) -> Requirement:
    try:
        return Requirement(line)
    except InvalidRequirement as e:
        raise ConfigError(f"not a requirement: {line!r} ({e})") from e


def needed(requirement: Requirement, extras: Iterable[str], env: dict[str, str]) -> bool:
    """Whether a Requires-Dist line applies on the target, for a package asked for with ``extras``."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))


@dataclass(frozen=True)
class Closure:
    """The pins to fetch, in the order they were reached, and the names left to the target."""
    pins: dict[str, str]
    left_out: list[str]


def closure(roots: Iterable[str], pins: dict[str, str], requires: Callable[[dict[str, str]], dict[str, list[str]]],
            have: set[str], env: dict[str, str]) -> Closure:
    """Breadth-first over Requires-Dist, one level at a time: ``requires({name: version})`` gives each pinned
    package's requirement lines (one call per level, so that a level downloads in one go)."""
    chosen: dict[str, str] = {}
    extras_of: dict[str, set[str]] = {}
    left_out: list[str] = []
    level = [(r, "the command line") for r in map(parse, roots) if needed(r, (), env)]
    while level:
        expand: list[str] = []
        for requirement, wanted_by in level:
            name = canonical(requirement.name)
            if name in have:
                left_out += [name] if name not in left_out else []
                continue
            if name not in pins:
                raise ConfigError(f"{name} (required by {wanted_by}) has no pin in the lock: add it to requirements.lock "
                                  f"(`make lock`) or name it with --have if the target has it")
            if not requirement.specifier.contains(pins[name], prereleases=True):
                raise ConfigError(f"{name}=={pins[name]} (the lock's pin) does not satisfy {requirement} (required by "
                                  f"{wanted_by}): the lock is inconsistent; rebuild it (`make lock`)")
            if name in chosen and set(requirement.extras) <= extras_of[name]:
                continue
            chosen[name] = pins[name]
            extras_of[name] = extras_of.get(name, set()) | set(requirement.extras)
            expand += [name] if name not in expand else []
        lines = requires({name: pins[name] for name in expand}) if expand else {}
        level = [(dependency, f"{name}=={pins[name]}") for name in expand for dependency in map(parse, lines[name])
                 if needed(dependency, extras_of[name], env)]
    return Closure(chosen, left_out)


def wheel_requires(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next((n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
        if metadata is None:
            raise ConfigError(f"{wheel.name}: no .dist-info/METADATA; not a wheel")
        message = email.parser.Parser().parsestr(archive.read(metadata).decode("utf-8"))
    return message.get_all("Requires-Dist") or []


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def pure_python(wheel: Path) -> bool:
    """A wheel tagged for any interpreter ABI and platform (``...-none-any.whl``)."""
    return wheel.name.endswith("-none-any.whl")


class Downloader:
    """pip, for another Python and platform: wheels only, no dependency resolution (the lock decides)."""

    def __init__(self, out: Path, python: str, platforms: Iterable[str] = PLATFORMS):
        self.out, self.python, self.platforms = out, python, tuple(platforms)
        self.built_here: list[str] = []
        version = tuple(int(p) for p in python.split("."))
        self.tags = set(cpython_tags(version, platforms=self.platforms)) | set(
            compatible_tags(version, interpreter=f"cp{version[0]}{version[1]}", platforms=self.platforms))

    def pip(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
                              capture_output=True, text=True)

    def fetch_all(self, pins: dict[str, str]) -> dict[str, Path]:
        """``fetch`` for many, in one pip call when every one has a wheel (pip stops at the first that has none)."""
        missing = {n: v for n, v in pins.items() if not self.find(n, v)}
        if len(missing) > 1:
            self.pip("download", *self.download_flags(), *(f"{n}=={v}" for n, v in missing.items()))
        return {name: self.fetch(name, version) for name, version in pins.items()}

    def download_flags(self) -> list[str]:
        platform_flags = [flag for p in self.platforms for flag in ("--platform", p)]
        return ["--no-deps", "--only-binary=:all:", "--python-version", self.python, "--implementation", "cp",
                *platform_flags, "--dest", str(self.out)]

    def fetch(self, name: str, version: str) -> Path:
        """The wheel of ``name==version`` in ``out``: downloaded, or built here from the source when pure Python."""
        found = self.find(name, version)
        if found:
            return found
        got = self.pip("download", *self.download_flags(), f"{name}=={version}")
        if got.returncode != 0:
            return self.build(name, version, got.stderr)
        found = self.find(name, version)
        if not found:
            raise ConfigError(f"pip downloaded no wheel for {name}=={version} into {self.out}")
        return found

    def build(self, name: str, version: str, download_error: str) -> Path:
        """A wheel built from the source distribution: usable on the target only when pure Python."""
        with tempfile.TemporaryDirectory() as tmp:
            built = self.pip("wheel", "--no-deps", "--wheel-dir", tmp, f"{name}=={version}")
            wheels = list(Path(tmp).glob("*.whl"))
            if built.returncode != 0 or not wheels:
                last = (download_error.strip().splitlines() or ["(no message)"])[-1]
                raise ConfigError(f"no wheel of {name}=={version} for Python {self.python} on "
                                  f"{self.platforms[0]}, and building one failed: {last}")
            if not pure_python(wheels[0]):
                raise ConfigError(f"{name}=={version} has no wheel for Python {self.python} on {self.platforms[0]} and "
                                  f"builds only a platform wheel ({wheels[0].name}): build it on the target")
            target = self.out / wheels[0].name
            target.write_bytes(wheels[0].read_bytes())
        self.built_here.append(target.name)
        return target

    def find(self, name: str, version: str) -> Path | None:
        """A wheel of ``name==version`` in ``out`` that installs on the target (one left by a run for another
        Python or platform is not)."""
        for path in self.out.glob("*.whl"):
            try:
                wheel, wheel_version, _, tags = parse_wheel_filename(path.name)
            except InvalidWheelFilename:
                continue
            if canonical(wheel) == name and str(wheel_version) == version and tags & self.tags:
                return path
        return None


def project_requirements() -> list[str]:
    """The installed project's own dependency lines (pyproject.toml), markers kept."""
    try:
        lines = importlib.metadata.requires("paper-repro") or []
    except importlib.metadata.PackageNotFoundError as e:
        raise ConfigError("paper-repro is not installed here (`make setup`); name what to fetch with --for") from e
    return [line for line in lines if "extra ==" not in line]


def build_wheelhouse(out: Path, lock: Path, roots: list[str], have: set[str], python: str,
                     quiet: bool = False) -> dict:
    """Download the closure into ``out``; write requirements.txt and the manifest; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    pins, env = read_lock(lock), target_environment(python)
    downloader = Downloader(out, python)
    files: dict[str, Path] = {}
    bar = tqdm(desc="wheels", unit="wheel", disable=quiet)

    def requires(level: dict[str, str]) -> dict[str, list[str]]:
        files.update(downloader.fetch_all(level))
        bar.update(len(level))
        return {name: wheel_requires(files[name]) for name in level}

    try:
        result = closure(roots, pins, requires, have, env)
    finally:
        bar.close()
    (out / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(result.pins.items())))
    manifest = {
        "python": python, "platforms": list(PLATFORMS), "lock": lock.name, "lock_md5": atomic.file_md5(lock),
        "roots": roots, "left_to_the_target": sorted(result.left_out),
        "built_here_pure_python": sorted(downloader.built_here),
        "total_bytes": sum(p.stat().st_size for p in files.values()),
        "files": {p.name: atomic.file_md5(p) for p in sorted(files.values())},
    }
    atomic.write_json(out / MANIFEST, manifest)
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the wheels, requirements.txt and the manifest")
    p.add_argument("--python", default="3.12", help="the target's Python X.Y (default 3.12)")
    p.add_argument("--lock", type=Path, default=Path("requirements.lock"), help="pins (default requirements.lock)")
    p.add_argument("--for", dest="roots", nargs="+", metavar="REQ",
                   help="what to fetch with its closure (default: the project's dependencies)")
    p.add_argument("--have", nargs="+", default=[], metavar="NAME",
                   help="packages the target already has: left out with what only they need")
    p.add_argument("--have-from", type=Path, metavar="FILE",
                   help="the target's `pip freeze` (or `pip list --format=freeze`): every package named is left out")
    p.add_argument("--with-torch", action="store_true",
                   help="fetch the torch stack too (torch, torchvision, triton, nvidia-*, cuda-*): large")


def have_set(args: argparse.Namespace) -> set[str]:
    names = {canonical(n) for n in (*args.have, *INSTALLER)}
    if args.have_from:
        names |= set(read_lock(args.have_from))
    return names if args.with_torch else names | set(TORCH_STACK)


def main(args: argparse.Namespace) -> int:
    if not re.fullmatch(r"3\.\d+", args.python):
        raise ConfigError(f"--python {args.python}: give the target's Python as X.Y, e.g. 3.12")
    if not args.lock.is_file():
        raise ConfigError(f"--lock {args.lock}: no such file (run from the repository root)")
    roots = args.roots or project_requirements()
    manifest = build_wheelhouse(args.out, args.lock, roots, have_set(args), args.python,
                                quiet=args.quiet)
    size = manifest["total_bytes"] / 2**20
    print(f"{len(manifest['files'])} wheels, {size:.1f} MiB, for CPython {args.python} in {args.out}/ "
          f"(manifest {MANIFEST}); left to the target: {', '.join(manifest['left_to_the_target']) or 'nothing'}")
    print(f"on the target, from the repository root: python{args.python} -m pip install --no-index --no-deps "
          f"--find-links {args.out} -r {args.out}/requirements.txt --target SITE && export PYTHONPATH=SITE")
    return 0
