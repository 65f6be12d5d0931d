"""A tiny synthetic but schema-valid pipeline tree (metrics/, runs/, data/prepared/meta.json) for
the tests of verify, the claims checks and the notebooks. The training and evaluation stages are
written elsewhere; this builds against the contract in docs/contracts.md so our tests need
neither data nor a GPU. Accuracies follow the EnResNet poster, so claims are near their values."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from safetensors.numpy import save_file

ATTACKS = ("natural", "fgsm", "ifgsm20", "cw_ref")
AUDIT = ("pgd50_eot@0.031", "cw_linf@0.031")
PAPER_COLUMN = {"natural": "A1", "fgsm": "A2", "ifgsm20": "A3", "cw_ref": "A4"}
FLOAT_PGD = {  # poster values (natural, fgsm, ifgsm20, cw_ref)
    "resnet20": (75.11, 50.89, 46.03, 58.73),
    "en1resnet20": (77.21, 55.35, 49.06, 65.69),
    "en2resnet20": (80.34, 57.23, 50.06, 66.47),
    "en5resnet20": (82.52, 58.92, 51.48, 67.73),
}
QUANT_PENALTY = {"none": 0.0, "binary": 8.0, "ternary": 3.0, "4bit": 1.0}
ZERO_CHANNELS = {"natural": 0.30, "pgd_at": 0.05, "tradeoff": 0.15}
SMALL_WEIGHTS = {"natural": 0.09, "pgd_at": 0.035, "tradeoff": 0.05}
LAYERS = {  # name -> shape; 3x3 convs are quantized, the 1x1 shortcut, fc and bn are not
    "conv1.weight": (8, 3, 3, 3),
    "layer1.0.conv1.weight": (8, 8, 3, 3),
    "layer1.0.conv2.weight": (8, 8, 3, 3),
    "layer2.0.conv1.weight": (16, 8, 3, 3),
    "layer2.0.conv2.weight": (16, 16, 3, 3),
    "layer2.0.shortcut.weight": (16, 8, 1, 1),
    "bn.weight": (16,),
    "fc.weight": (10, 16),
    "fc.bias": (10,),
}
QUANTIZED = [n for n, s in LAYERS.items() if len(s) == 4 and s[2:] == (3, 3)]
BITS = {"none": 32.0, "binary": 1.0, "ternary": 2.0, "4bit": 4.0}
SEED_OFFSETS = (-0.3, 0.1, 0.2, -0.1, 0.1)
T_975_DF4 = 2.776
SEEDS = list(range(len(SEED_OFFSETS)))


def training(profile: str = "paper", quantized: bool = True) -> dict[str, Any]:
    """The metrics' record of the training in effect: the paper recipe for profile 'paper', else a
    reduced one (10 epochs, PGD-5, 10,000 images)."""
    from paper_repro import config

    settings = config.to_dict(config.TrainSettings())
    split = {"train_images": 45000, "val_images": 5000, "val_size": 5000, "split_seed": 0}
    if profile != "paper":
        settings.update(epochs=10, milestones=[6, 8], pgd={**settings["pgd"], "steps": 5})
        settings["relax"] = {**settings["relax"], "hard_epoch": 6}
        split.update(train_images=10000, val_images=1000, val_size=1000)
    return {"settings": settings, "split": split, "selection_metric": "val_pgd_acc", "selected": {"epoch": 1},
            "epochs_done": settings["epochs"], "phase2_epochs": 1, "trained_quantized": True, "wall_s": 1.0}

# (model, quantizer, method, loss, loss_params)
DEFAULT_RUNS: tuple[tuple[str, str, str, str, dict], ...] = (
    ("resnet20", "none", "none", "natural", {}),
    ("resnet20", "none", "none", "pgd_at", {}),
    ("en1resnet20", "none", "none", "pgd_at", {}),
    ("en2resnet20", "none", "none", "pgd_at", {}),
    ("en1resnet20", "binary", "BR", "pgd_at", {}),
    ("en1resnet20", "ternary", "BR", "natural", {}),
    ("en1resnet20", "ternary", "BR", "pgd_at", {}),
    ("en1resnet20", "ternary", "BR", "tradeoff", {"w_adv": 8.0, "w_nat": 1.0}),
    ("en1resnet20", "ternary", "BR", "tradeoff", {"w_adv": 4.0, "w_nat": 1.0}),
    ("en1resnet20", "ternary", "BC", "pgd_at", {}),
    ("en1resnet20", "4bit", "BR", "natural", {}),
    ("en1resnet20", "4bit", "BR", "pgd_at", {}),
    ("en1resnet20", "4bit", "BR", "tradeoff", {"w_adv": 8.0, "w_nat": 1.0}),
)


def run_name(model: str, quantizer: str, method: str, loss: str, loss_params: dict | None = None) -> str:
    """<model>-<quant>-<method>-<loss>, quant 'fp' for float models (no method)."""
    parts = [model, "fp"] if quantizer == "none" else [model, quantizer, method.lower()]
    name = "-".join(parts + [loss])
    if loss == "tradeoff" and loss_params and loss_params.get("w_adv", 8.0) != 8.0:
        name += f"-wadv{loss_params['w_adv']:g}"
    return name


def attack_settings(attack: str) -> dict[str, Any]:
    """An entry's ``settings`` as evaluate records them: the paper's (recipe) for the paper columns; {} otherwise."""
    from paper_repro import recipe

    paper = recipe.PAPER_ATTACK_SETTINGS.get(attack)
    if paper is None:
        return {}
    return {"function": paper["function"], "options": dict(paper["options"]), "eot": paper["eot"],
            "noise": paper["noise"], "noisy_only": False}


def accuracy_entry(attack: str, mean: float, eps: float = 0.031, n: int = 10000) -> dict[str, Any]:
    per_seed = [round(mean + o, 2) for o in SEED_OFFSETS]
    std = float(np.std(per_seed, ddof=1))
    half = T_975_DF4 * std / np.sqrt(len(per_seed))
    entry = {"attack": attack, "eps": 0.0 if attack == "natural" else eps, "n": n, "mean": round(mean, 2),
             "std": round(std, 2), "ci95": [round(mean - half, 2), round(mean + half, 2)],
             "per_seed": per_seed, "correct": [int(round(p * n / 100)) for p in per_seed], "eot": 1,
             "settings": attack_settings(attack)}
    if attack in PAPER_COLUMN:
        entry["paper_column"] = PAPER_COLUMN[attack]
    return entry


def accuracies(model: str, quantizer: str, method: str, loss: str, loss_params: dict) -> dict[str, float]:
    base = FLOAT_PGD.get(model, FLOAT_PGD["en1resnet20"])
    acc = {a: v - QUANT_PENALTY[quantizer] for a, v in zip(ATTACKS, base)}
    if method == "BC":
        acc = {a: v - 2.0 for a, v in acc.items()}
    if loss == "natural":
        acc = {"natural": 90.0 - QUANT_PENALTY[quantizer], "fgsm": 20.0, "ifgsm20": 2.0, "cw_ref": 10.0}
    elif loss == "tradeoff":
        gain = 4.0 if loss_params.get("w_adv", 8.0) == 8.0 else 6.0
        acc = {"natural": acc["natural"] + gain, "fgsm": acc["fgsm"] + 0.2,
               "ifgsm20": acc["ifgsm20"] - 1.0, "cw_ref": acc["cw_ref"] - 1.0}
    acc["pgd50_eot@0.031"] = max(acc["ifgsm20"] - 2.0, 1.0)
    acc["cw_linf@0.031"] = acc["ifgsm20"] - 1.0
    return acc


def quantize(w: np.ndarray, scheme: str) -> np.ndarray:
    """The spec's quantizers, enough for synthetic deployed weights."""
    a = np.abs(w)
    if scheme == "binary":
        return a.mean() * np.sign(w)
    if scheme == "ternary":
        mask = a >= 0.7 * a.mean()
        return (a * mask).sum() / w.size * mask * np.sign(w)
    if scheme == "4bit":
        d = a.max() / 15
        q = np.clip(np.floor((a + d) / (2 * d)), 0, 7) * (a > d)
        s = (a * q).sum() / max((q * q).sum(), 1)
        return s * q * np.sign(w)
    return w


def weights(quantizer: str, loss: str, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(float W, deployed) with a share of all-zero input channels and of tiny weights set by loss."""
    rng = np.random.default_rng(seed)
    floats, deployed = {}, {}
    for name, shape in LAYERS.items():
        w = rng.normal(0.0, 0.1, size=shape).astype(np.float32)
        if name in QUANTIZED:
            tiny = rng.random(shape) < SMALL_WEIGHTS.get(loss, 0.05)
            w[tiny] *= 1e-3
            if quantizer not in ("none", "binary"):
                n_zero = int(round(ZERO_CHANNELS.get(loss, 0.1) * shape[1]))
                w[:, rng.permutation(shape[1])[:n_zero]] *= 1e-4
        floats[name] = w
        deployed[name] = quantize(w, quantizer).astype(np.float32) if name in QUANTIZED else w
    return floats, deployed


def layer_rows(deployed: dict[str, np.ndarray], names: Iterable[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        t = deployed[name]
        zero_in = np.all(t == 0, axis=(0, 2, 3))
        zero_out = np.all(t == 0, axis=(1, 2, 3))
        rows.append({"name": name, "shape": list(t.shape), "numel": int(t.size),
                     "nnz": int(np.count_nonzero(t)),
                     "weight_sparsity": round(100 * float(np.mean(t == 0)), 2),
                     "channel_sparsity": round(100 * float(zero_in.mean()), 2),
                     "filter_sparsity": round(100 * float(zero_out.mean()), 2),
                     "levels": int(np.unique(t).size)})
    return rows


def sparsity(deployed: dict[str, np.ndarray]) -> dict[str, Any]:
    rows = layer_rows(deployed, QUANTIZED)
    n_q = sum(r["numel"] for r in rows)
    zeros_q = sum(r["numel"] - r["nnz"] for r in rows)
    chans = sum(deployed[n].shape[1] for n in QUANTIZED)
    filters = sum(deployed[n].shape[0] for n in QUANTIZED)
    zero_ch = sum(int(np.all(deployed[n] == 0, axis=(0, 2, 3)).sum()) for n in QUANTIZED)
    zero_f = sum(int(np.all(deployed[n] == 0, axis=(1, 2, 3)).sum()) for n in QUANTIZED)
    total = sum(t.size for t in deployed.values())
    zeros = sum(int((t == 0).sum()) for t in deployed.values())
    return {"weight": round(100 * zeros_q / n_q, 2), "channel": round(100 * zero_ch / chans, 2),
            "filter": round(100 * zero_f / filters, 2), "model_weight": round(100 * zeros / total, 2),
            "counts": {"quantized_weights": n_q, "zero_quantized_weights": zeros_q, "channels": chans,
                       "zero_channels": zero_ch, "filters": filters, "zero_filters": zero_f},
            "layers": rows}


def at_init(quantizer: str, seed: int) -> dict[str, Any] | None:
    """The quantizer applied to fresh Gaussian weights (what the metrics' sparsity_at_init holds)."""
    if quantizer == "none":
        return None
    rng = np.random.default_rng(1000 + seed)
    fresh = {n: quantize(rng.normal(0.0, 0.1, size=s).astype(np.float32), quantizer) for n, s in LAYERS.items()
             if n in QUANTIZED}
    doc = sparsity(fresh)
    return {**{k: doc[k] for k in ("weight", "channel", "filter", "counts")},
            "layers": [{k: r[k] for k in ("name", "numel", "nnz")} for r in doc["layers"]]}


def size(deployed: dict[str, np.ndarray], quantizer: str) -> dict[str, Any]:
    n_q = sum(deployed[n].size for n in QUANTIZED)
    n_other = sum(t.size for n, t in deployed.items() if n not in QUANTIZED)
    bits = BITS[quantizer]
    packed = int(np.ceil(n_q * bits / 8)) + 4 * n_other + (4 * len(QUANTIZED) if quantizer != "none" else 0)
    fp32 = 4 * (n_q + n_other)
    return {"bits_per_quantized_weight": bits, "packed_bytes": packed, "fp32_bytes": fp32,
            "compression": round(fp32 / packed, 2)}


def make_metrics(model: str, quantizer: str, method: str, loss: str, loss_params: dict | None = None, *,
                 official: bool = False, profile: str = "smoke", seed: int = 0,
                 deployed: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """One schema-valid metrics/<run>.json document."""
    loss_params = dict(loss_params or {})
    if deployed is None:
        deployed = weights(quantizer, loss, seed)[1]
    acc = accuracies(model, quantizer, method, loss, loss_params)
    return {
        "schema_version": 1, "run": run_name(model, quantizer, method, loss, loss_params), "profile": profile,
        "model": model, "quantizer": quantizer, "method": method, "loss": loss, "loss_params": loss_params,
        "noise": model.startswith("en"), "n_examples": 10000, "seeds": SEEDS,
        "accuracy": {a: accuracy_entry(a, v) for a, v in acc.items()},
        "sanity": {"deployed_weights_quantized": {"passed": True, "detail": "synthetic", "values": {}}},
        "sparsity": sparsity(deployed), "sparsity_at_init": at_init(quantizer, seed),
        "training": training(profile, quantizer != "none"), "size": size(deployed, quantizer),
        "data": {"official": official, "archive_md5": "0" * 32 if not official else "c58f30108f718f92721af3b95e74349a",
                 "source": "synthetic test fixture" if not official else "official archive",
                 "n_train": 45000, "n_test": 10000},
        "provenance": {"epochs": 1, "train_seed": seed, "versions": {"python": "3.11"}, "device": "cpu",
                       "wall_s": 1.0},
    }


def summary_row(m: dict[str, Any]) -> dict[str, Any]:
    row = {k: m[k] for k in ("run", "model", "quantizer", "method", "loss", "profile")}
    row["official"] = m["data"]["official"]
    for attack, entry in m["accuracy"].items():
        row[f"{attack}_mean"], row[f"{attack}_std"] = entry["mean"], entry.get("std")
    row.update(sparsity_weight=m["sparsity"].get("weight"), sparsity_channel=m["sparsity"].get("channel"),
               size_compression=m["size"].get("compression"))
    return row


def write_metrics(metrics_dir: Path, docs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics/<run>.json for each document plus metrics/summary.csv."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    docs = list(docs)
    for m in docs:
        (metrics_dir / f"{m['run']}.json").write_text(json.dumps(m, indent=1))
    rows = [summary_row(m) for m in docs]
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(metrics_dir / "summary.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return docs


def write_tree(root: Path, *, official: bool = False, profile: str = "smoke",
               runs: Iterable[tuple] = DEFAULT_RUNS, with_weights: bool = True) -> dict[str, Path]:
    """Write metrics/, runs/ and data/prepared/meta.json under root; return their paths."""
    root = Path(root)
    paths = {"root": root, "metrics": root / "metrics", "runs": root / "runs",
             "data_meta": root / "data" / "prepared" / "meta.json", "reports": root / "reports"}
    docs = []
    for i, (model, quantizer, method, loss, params) in enumerate(runs):
        floats, deployed = weights(quantizer, loss, seed=i)
        m = make_metrics(model, quantizer, method, loss, params, official=official, profile=profile, seed=i,
                         deployed=deployed)
        docs.append(m)
        if with_weights:
            run_dir = paths["runs"] / m["run"]
            run_dir.mkdir(parents=True, exist_ok=True)
            save_file(floats, str(run_dir / "float.safetensors"))
            save_file(deployed, str(run_dir / "deployed.safetensors"))
            sidecar = {"arch": model, "quantizer": quantizer, "method": method, "loss": loss,
                       "quantized": QUANTIZED if quantizer != "none" else []}
            (run_dir / "deployed.json").write_text(json.dumps(sidecar))
    write_metrics(paths["metrics"], docs)
    paths["data_meta"].parent.mkdir(parents=True, exist_ok=True)
    paths["data_meta"].write_text(json.dumps({
        "dataset": "cifar10", "official": official,
        "source": "official archive" if official else "synthetic test fixture",
        "archive_md5": "c58f30108f718f92721af3b95e74349a" if official else None,
        "md5_verified": official, "n_train": 45000, "n_val": 5000, "n_test": 10000,
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    }, indent=1))
    return paths


# Per-layer deviations (pp, summing to 0) of the zero share of simple_metrics' 10 layers: the at-init arm takes
# them reversed, so the paired per-layer changes spread by about +-1 pp around the overall change.
LAYER_SPREAD = (-0.9, -0.7, -0.5, -0.3, -0.1, 0.1, 0.3, 0.5, 0.7, 0.9)


def spread_layers(weight: float, spread: tuple[float, ...], levels: int | None = None) -> list[dict[str, Any]]:
    """10 layers of 10,000 weights whose zero shares average ``weight`` %."""
    rows = []
    for i, d in enumerate(spread):
        zero = min(100.0, max(0.0, weight + d if 0 < weight < 100 else weight))
        rows.append({"name": f"layer{i}.weight", "shape": [100, 100], "numel": 10000,
                     "nnz": 10000 - int(round(zero * 100)), "weight_sparsity": round(zero, 2),
                     "channel_sparsity": 0.0, "filter_sparsity": 0.0, "levels": levels})
    return rows


def simple_metrics(run: str, model: str = "en1resnet20", quantizer: str = "ternary", method: str = "BR",
                   loss: str = "pgd_at", *, acc: dict[str, float] | None = None, channel: float | None = None,
                   weight: float | None = None, per_seed: bool = True, official: bool = True,
                   profile: str = "paper", levels: int = 3, loss_params: dict | None = None,
                   init_weight: float | None = None, n: int = 10000) -> dict[str, Any]:
    """A hand-made metrics document with exactly the numbers a test sets (no weights behind it)."""
    accuracy = {}
    for attack, mean in (acc or {}).items():
        entry = accuracy_entry(attack, mean, n=n)
        if not per_seed:
            entry = {k: v for k, v in entry.items() if k not in ("std", "ci95", "per_seed", "correct")}
        accuracy[attack] = entry
    sparsity_doc: dict[str, Any] = {"weight": None, "channel": None, "filter": None, "model_weight": None,
                                    "layers": [{"name": "conv1.weight", "shape": [8, 3, 3, 3], "numel": 216,
                                                "nnz": 100, "weight_sparsity": 50.0, "channel_sparsity": 0.0,
                                                "filter_sparsity": 0.0, "levels": levels}]}
    counts: dict[str, int] = {}
    if channel is not None:  # 1,000 (layer, input channel) pairs
        sparsity_doc["channel"] = channel
        counts.update(channels=1000, zero_channels=int(round(channel * 10)))
    if weight is not None:  # 100,000 quantized weights
        sparsity_doc["weight"] = weight
        counts.update(quantized_weights=100000, zero_quantized_weights=int(round(weight * 1000)))
        sparsity_doc["layers"] = spread_layers(weight, LAYER_SPREAD, levels)
    sparsity_doc["counts"] = counts
    if loss_params is None:
        loss_params = {"w_adv": 8.0, "w_nat": 1.0} if loss == "tradeoff" else {}
    init = None if init_weight is None else {
        "weight": init_weight, "counts": {"quantized_weights": 100000, "zero_quantized_weights": int(round(init_weight * 1000))},
        "layers": [{k: r[k] for k in ("name", "numel", "nnz")} for r in spread_layers(init_weight, LAYER_SPREAD[::-1])]}
    return {"schema_version": 1, "run": run, "profile": profile, "model": model, "quantizer": quantizer,
            "method": method, "loss": loss, "loss_params": dict(loss_params), "noise": True,
            "n_examples": n, "seeds": SEEDS, "accuracy": accuracy, "sanity": {},
            "sparsity": sparsity_doc, "sparsity_at_init": init, "training": training(profile),
            "size": {"bits_per_quantized_weight": None, "packed_bytes": None, "fp32_bytes": None, "compression": None},
            "data": {"official": official, "source": "official archive" if official else "synthetic",
                     "archive_md5": "c58f30108f718f92721af3b95e74349a" if official else "0" * 32,
                     "n_train": 50000, "n_test": 10000},
            "provenance": {"epochs": None, "train_seed": 0, "versions": {}, "device": "cpu", "wall_s": None}}
