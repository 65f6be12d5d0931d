"""The published models as ready ``nn.Module``s, so anyone can attack them with their own tools:

    from paper_repro import zoo
    model = zoo.load("en1resnet20-4bit-br-pgd_at", profile="cpu")   # eval mode, deployed Q(W), noise on
    zoo.available("cpu"); zoo.card("en1resnet20-4bit-br-pgd_at")     # names; the model card (a dict)

Inputs are images in [0, 1] (no normalisation: it lives in the model); outputs are logits. The models
are read from ``results/<profile>/models/`` of this repository (or ``root=``): the packed weights are
unpacked to exactly the deployed quantized tensors that the evaluation attacked. EnResNets keep their
noise on in eval mode, as in the evaluation (a randomized defense): call ``model.seed_noise(s)`` for
repeatable draws, or ``model.set_noise(False)`` to attack the deterministic network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_ENV = "PAPER_REPRO_RESULTS"


class ZooError(LookupError):
    """No such published model (the message lists what is available)."""


def results_root(root: str | Path | None = None) -> Path:
    """Where published bundles live: ``root``, else $PAPER_REPRO_RESULTS, else <repository>/results."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(RESULTS_ENV) or Path(__file__).resolve().parents[1] / "results")


def _models_dir(profile: str, root: str | Path | None) -> Path:
    folder = results_root(root) / profile / "models"
    if not folder.is_dir():
        raise ZooError(f"no published bundle for profile {profile!r} at {folder.parent} "
                       f"(profiles here: {', '.join(profiles(root)) or 'none'})")
    return folder


def profiles(root: str | Path | None = None) -> list[str]:
    base = results_root(root)
    return sorted(p.name for p in base.iterdir() if (p / "models").is_dir()) if base.is_dir() else []


def available(profile: str = "cpu", root: str | Path | None = None) -> list[str]:
    """Names of the published models of ``profile``."""
    return sorted(p.stem for p in _models_dir(profile, root).glob("*.json"))


def card(name: str, profile: str = "cpu", root: str | Path | None = None) -> dict[str, Any]:
    """The model card: model, quantizer, method, loss, eps, accuracies with n and intervals, sparsity,
    packed size, data provenance, code commit, versions, hardware, wall time."""
    path = _models_dir(profile, root) / f"{name}.json"
    if not path.is_file():
        raise ZooError(f"no published model {name!r} in profile {profile!r}; available: "
                       f"{', '.join(available(profile, root))}")
    return json.loads(path.read_text())


def load(name: str, profile: str = "cpu", root: str | Path | None = None,
         device: str | torch.device = "cpu") -> nn.Module:
    """The deployed model ``name`` of ``profile`` in eval mode, on ``device``."""
    from .models import build
    from .quant import load_packed

    card(name, profile, root)  # a clear error for an unknown name
    tensors, header = load_packed(_models_dir(profile, root) / f"{name}.safetensors")
    meta = header.get("meta") or {}
    model = build(meta["arch"], **(meta.get("arch_config") or {}))
    model.load_state_dict(tensors)
    return model.to(device).eval()
