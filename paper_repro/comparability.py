"""Is a run comparable with the paper (or, for CIFAR-100 / SVHN runs, with the authors' recipe on that dataset)? Computed from the settings that were in effect (recorded in its
metrics), field by field against the paper recipe (recipe.py), never from a profile label; every
"not comparable" verdict names its deviations ("epochs 10 vs 200; 10,000 training images vs 45,000;
PGD-3 vs PGD-10 training attack")."""
from __future__ import annotations

from typing import Any, Mapping

from .metrics_schema import dataset_of
from .recipe import (AUGMENT, BATCH_SIZE, DATASET_LABELS, DEFAULT_DATASET, EPOCHS, EVAL_SEEDS, LR, LR_GAMMA,
                     MILESTONES, MOMENTUM, NESTEROV, PAPER_ATTACKS, PAPER_EPS, RELAX, SCHEDULE,
                     TEST_IMAGES_BY_DATASET, TRAIN_IMAGES_BY_DATASET, TRAIN_PGD, VAL_IMAGES, WEIGHT_DECAY)

# The training settings compared field by field, with how each is named in a deviation.
TRAIN_FIELDS: dict[str, tuple[str, Any]] = {
    "epochs": ("epochs", EPOCHS),
    "batch_size": ("batch size", BATCH_SIZE),
    "lr": ("lr", LR),
    "momentum": ("momentum", MOMENTUM),
    "nesterov": ("nesterov", NESTEROV),
    "weight_decay": ("weight decay", WEIGHT_DECAY),
    "schedule": ("lr schedule", SCHEDULE),
    "augment": ("augmentation", AUGMENT),
}


def _num(x: Any) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x)


def _named(dataset: str) -> str:
    """'' for CIFAR-10 (the paper's data, the wording every report already uses), else 'SVHN ' etc."""
    return "" if dataset == DEFAULT_DATASET else f"{DATASET_LABELS[dataset]} "


def training_deviations(train: Mapping[str, Any], split: Mapping[str, Any], quantized: bool,
                        method: str, dataset: str = DEFAULT_DATASET) -> list[str]:
    """How the training settings in effect differ from the paper's (empty: the paper recipe)."""
    want_train = TRAIN_IMAGES_BY_DATASET[dataset]
    if not train:
        return ["training settings not recorded (metrics from an older version): recipe unknown"]
    out = [f"{label} {_num(train.get(key))} vs {_num(want)}" for key, (label, want) in TRAIN_FIELDS.items()
           if train.get(key) != want]
    if train.get("schedule", SCHEDULE) == "step" and list(train.get("milestones") or []) != list(MILESTONES):
        out.append(f"lr milestones {list(train.get('milestones') or [])} vs {list(MILESTONES)}")
    if train.get("schedule", SCHEDULE) == "step" and train.get("lr_gamma") != LR_GAMMA:
        out.append(f"lr gamma {train.get('lr_gamma')} vs {LR_GAMMA}")
    pgd = dict(train.get("pgd") or {})
    if pgd.get("steps") != TRAIN_PGD["steps"]:
        out.append(f"PGD-{pgd.get('steps')} vs PGD-{TRAIN_PGD['steps']} training attack")
    for key in ("eps", "step", "random_start"):
        if pgd.get(key) != TRAIN_PGD[key]:
            out.append(f"training PGD {key} {pgd.get(key)} vs {TRAIN_PGD[key]}")
    if quantized and method == "BR":
        relax = dict(train.get("relax") or {})
        for key, want in RELAX.items():
            if relax.get(key) != want:
                out.append(f"BR {key} {_num(relax.get(key))} vs {_num(want)}")
    if train.get("amp") == "bf16":
        out.append("bf16 autocast training vs fp32")
    n_train, n_val = split.get("train_images"), split.get("val_images")
    if n_train is None:
        out.append("training-set size not recorded")
    elif n_train != want_train:
        out.append(f"{_num(n_train)} {_named(dataset)}training images vs {_num(want_train)}")
    if n_val is not None and n_val != VAL_IMAGES:
        out.append(f"{_num(n_val)} selection images vs {_num(VAL_IMAGES)}")
    return out


def evaluation_deviations(m: Mapping[str, Any], attacks: tuple[str, ...] = PAPER_ATTACKS) -> list[str]:
    """How the evaluation in effect differs from the paper's (the whole test split: 10k CIFAR images, 26,032
    SVHN; its attacks, eps 0.031)."""
    out = []
    dataset = dataset_of(m)
    want, label = TEST_IMAGES_BY_DATASET[dataset], _named(dataset)
    acc = m.get("accuracy") or {}
    sizes = {key: (acc.get(key) or {}).get("n", m.get("n_examples")) for key in attacks if key in acc}
    if not sizes:
        sizes = {"all": m.get("n_examples")}
    if len(set(sizes.values())) == 1:
        n = next(iter(sizes.values()))
        if n != want:
            out.append(f"{_num(n)} {label}test images vs {_num(want)}")
    else:
        out += [f"{key} on {_num(n)} {label}test images vs {_num(want)}" for key, n in sizes.items() if n != want]
    seeds = m.get("seeds") or []
    if m.get("noise_active", m.get("noise")) and len(seeds) < EVAL_SEEDS:
        out.append(f"{len(seeds)} noise seed(s) vs {EVAL_SEEDS}")
    for key in attacks:
        entry = acc.get(key)
        if entry is None:
            continue
        want = 0.0 if key == "natural" else PAPER_EPS
        if entry.get("eps") not in (None, want):
            out.append(f"{key} at eps {entry.get('eps')} vs {want}")
    if (m.get("settings") or {}).get("amp") == "bf16":
        out.append("bf16 autocast evaluation vs fp32")
    return out


def deviations(m: Mapping[str, Any]) -> list[str]:
    """Every way one run's metrics differ from the paper's recipe and data; [] means comparable."""
    out = []
    data = m.get("data") or {}
    dataset = dataset_of(m)
    if not data.get("official"):
        out.append(f"not the official {DATASET_LABELS[dataset]} data" + (f" ({data.get('source')})" if data.get("source") else ""))
    training = m.get("training") or {}
    quantized = str(m.get("quantizer", "none")) not in ("none", "fp")
    out += training_deviations(training.get("settings") or {}, training.get("split") or {}, quantized,
                               str(m.get("method")), dataset)
    if quantized and training and training.get("trained_quantized") is False:
        out.append("no phase-2 epoch: the deployed Q(W) never trained quantized")
    out += evaluation_deviations(m)
    return out
