"""Checkpoints: safetensors weights plus a JSON sidecar; nothing is ever unpickled.

``save(path, tensors, sidecar)`` writes ``path`` (safetensors) and ``path.with_suffix(".json")``
(sidecar) as one unit: both are first written completely under pending names (``.<name>.pending``),
the pending sidecar last; from then on the save is committed, and the two renames into place are
redone by ``recover`` if a crash stops them half-way (a write-ahead journal of one entry). A crash
before the pending sidecar exists leaves the previous pair untouched. The sidecar records the
SHA-256 of the weights file, so a corrupted file or a weights/sidecar pair from two different
saves is detected on load (and the error names an unfinished save when that is the cause). ``load_model`` rebuilds the architecture
named in the sidecar (``arch`` / ``arch_config``) and loads the weights into it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from . import atomic

FORMAT = "paper_repro.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, or does not fit the requested architecture."""


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def pending_path(path: str | os.PathLike) -> Path:
    """Where ``save`` stages a file (weights or sidecar) before renaming it into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.pending")


def versions() -> dict[str, str]:
    """Library versions recorded in every sidecar."""
    import safetensors

    from . import __version__

    return {
        "paper_repro": __version__,
        "code_commit": code_commit(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def code_commit() -> str:
    """The git commit of the package's code, "+dirty" when its tracked files differ from it, or
    "unknown" outside a git checkout: what a published number names as the code that made it."""
    import subprocess

    package = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(package)],
                               cwd=package, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _cpu_contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies with no shared storage (what safetensors requires)."""
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entry {name!r} is a {type(t).__name__}, not a Tensor")
        out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


def save(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], sidecar: Mapping[str, Any],
         on_step: Callable[[str], None] | None = None) -> Path:
    """Write ``tensors`` to ``path`` (safetensors) and ``sidecar`` (+ format, versions, sha256) as JSON,
    as one unit (see the module docstring). ``on_step(step)``, if given, is called after each step
    ("weights-tmp": weights in a temp file; "staged": pending weights written; "committed": pending
    sidecar written; "weights": weights renamed into place, sidecar not yet): the fault-injection tests
    kill the process there."""
    from safetensors.torch import save as st_save

    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"weights path must not end in .json (that is the sidecar): {path}")
    meta = {"format": FORMAT}
    if "arch" in sidecar:
        meta["arch"] = str(sidecar["arch"])
    blob = st_save(_cpu_contiguous(tensors), metadata=meta)
    record = dict(sidecar)
    record.setdefault("versions", versions())
    record.update(format=FORMAT, format_version=FORMAT_VERSION,
                  weights_file=path.name, weights_sha256=hashlib.sha256(blob).hexdigest())
    text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
    step = on_step or (lambda _: None)
    recover(path)  # finish (or drop) an earlier interrupted save before staging this one
    atomic.write_bytes(pending_path(path), blob, fsync=True, before_replace=lambda: step("weights-tmp"))
    step("staged")
    atomic.write_bytes(pending_path(sidecar_path(path)), text.encode(), fsync=True)  # the commit point
    atomic.fsync_dir(path.parent)
    step("committed")
    os.replace(pending_path(path), path)
    step("weights")
    os.replace(pending_path(sidecar_path(path)), sidecar_path(path))
    atomic.fsync_dir(path.parent)
    return path


def recover(path: str | os.PathLike) -> str | None:
    """Finish or drop an interrupted ``save`` of the checkpoint at ``path``; returns what was done (None:
    nothing to do). A committed save (its pending sidecar exists) is completed; a save that stopped
    before its commit point is discarded, which leaves the previous pair as it was. Only the writer of
    the checkpoint may call this (a reader would race with a save in progress)."""
    path = Path(path)
    weights, side = pending_path(path), pending_path(sidecar_path(path))
    if side.is_file():
        try:
            want = json.loads(side.read_text()).get("weights_sha256")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            want = None  # cannot happen for a file renamed into place whole; treat it as not committed
        source = weights if weights.is_file() else path
        have = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else None
        if want is not None and have == want:
            if source == weights:
                os.replace(weights, path)
            os.replace(side, sidecar_path(path))
            atomic.fsync_dir(path.parent)
            return f"completed the interrupted save of {path}"
        side.unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
        return f"discarded an unreadable pending save of {path}"
    if weights.is_file():
        weights.unlink()
        return f"discarded the unfinished save of {path} (it stopped before its sidecar was written)"
    return None


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON sidecar of the checkpoint at ``path`` (weights path or the .json itself)."""
    side = sidecar_path(path)
    if not side.is_file():
        unfinished = ("; a save of it was interrupted: `train --resume` completes it"
                      if pending_path(side).is_file() else "")
        raise CheckpointError(f"checkpoint sidecar missing: {side} (expected next to {Path(path).name}){unfinished}")
    try:
        record = json.loads(side.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint sidecar {side} is not valid JSON: {err}") from None
    found = record.get("format") if isinstance(record, dict) else type(record).__name__
    if found != FORMAT:
        raise CheckpointError(f"{side} is not a {FORMAT} sidecar (format: {found!r})")
    return record


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint: (tensors on ``device``, sidecar dict)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    record = read_sidecar(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint weights missing: {path} (sidecar {sidecar_path(path).name} exists)")
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != record.get("weights_sha256"):
        unfinished = pending_path(sidecar_path(path)).is_file()
        raise CheckpointError(
            f"checkpoint {path} does not match its sidecar (sha256 {digest[:12]}... != "
            f"{str(record.get('weights_sha256'))[:12]}...): "
            + ("a save of it was interrupted; `train --resume` completes it" if unfinished
               else "corrupted or from another save")
        )
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {err}") from None
    return {k: v.to(device) for k, v in tensors.items()}, record


def model_sidecar(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Sidecar fields describing a built model (``arch``, ``arch_config``) plus ``extra``."""
    arch = getattr(model, "arch", None)
    config = getattr(model, "arch_config", None)
    if arch is None or config is None:
        raise CheckpointError("model has no arch/arch_config: build it with paper_repro.models.build")
    return {"arch": arch, "arch_config": dict(config), **extra}


def save_model(path: str | os.PathLike, model: nn.Module, **extra: Any) -> Path:
    """Save ``model.state_dict()`` with its architecture and ``extra`` sidecar fields."""
    return save(path, model.state_dict(), model_sidecar(model, **extra))


def _describe(arch: str, config: Mapping[str, Any] | None) -> str:
    return f"{arch} {dict(config)}" if config else arch


def load_into(model: nn.Module, path: str | os.PathLike, tensors: Mapping[str, torch.Tensor] | None = None,
              record: Mapping[str, Any] | None = None) -> nn.Module:
    """Load a checkpoint into an already built ``model``; refuse one of another architecture."""
    if tensors is None or record is None:
        device = next(model.parameters()).device
        tensors, record = load(path, device)
    want = getattr(model, "arch", type(model).__name__)
    got = record.get("arch", "<no arch in sidecar>")
    if got != want:
        raise CheckpointError(
            f"architecture mismatch: checkpoint {path} holds {_describe(got, record.get('arch_config'))}, "
            f"but the model is {_describe(want, getattr(model, 'arch_config', None))}"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"architecture mismatch: checkpoint {path} (sidecar says {got}) does not fit model {want}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}, "
            f"wrong shape {wrong[:3]}{'...' if len(wrong) > 3 else ''}"
        )
    model.load_state_dict(tensors, strict=True)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *, arch: str | None = None) -> nn.Module:
    """Rebuild the sidecar's architecture, load the weights, move to ``device``; returned in eval mode.

    ``arch``, when given, is the architecture the caller expects; a checkpoint of another one
    raises ``CheckpointError`` naming both.
    """
    from .models import build

    tensors, record = load(path, "cpu")
    got = record.get("arch")
    if got is None:
        raise CheckpointError(f"checkpoint {path} has no 'arch' in its sidecar; cannot rebuild the model")
    if arch is not None and arch != got:
        raise CheckpointError(f"architecture mismatch: checkpoint {path} holds {got}, expected {arch}")
    try:
        model = build(got, **record.get("arch_config", {}))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot build {got!r} from its sidecar: {err}") from None
    load_into(model, path, tensors, record)
    return model.to(device).eval()
