"""Is a run comparable with the paper (or, for CIFAR-100 / SVHN runs, with the authors' recipe on that dataset)? Computed from the settings that were in effect (recorded in its
metrics), field by field against the paper recipe (recipe.py), never from a profile label; every
"not comparable" verdict names its deviations ("epochs 10 vs 200; 10,000 training images vs 45,000;
PGD-3 vs PGD-10 training attack").

Precision: what counts is whether bf16 autocast ran, recorded as ``amp_in_effect`` (training: by train and
train-stacked in the run's sidecar, copied to ``training.amp_in_effect``; evaluation: top-level ``amp_in_effect``).
Metrics written before it was recorded are judged from the configured ``amp`` as runtime.use_amp resolves it: "bf16"
on, "off" off, "auto" on exactly on CUDA, the device read from the settings (``device: cpu``) or from the recorded
device name (provenance.device / eval_device: runtime.device_name, "cpu (...)" off CUDA, the GPU's name on it); an
"auto" whose device cannot be told is named as a deviation ("precision in effect not recorded"), never assumed fp32.

Paper columns: each one's recorded ``settings`` (function, options) and the EOT and noise it ran with are compared
with recipe.PAPER_ATTACK_SETTINGS; an entry that does not record them is named too ("not recorded")."""
from __future__ import annotations

from typing import Any, Mapping

from .config import RESNET_NAME, WRN_NAME
from .metrics_schema import dataset_of
from .recipe import (AUGMENT, BATCH_SIZE, DATASET_LABELS, DEFAULT_DATASET, EPOCHS, EVAL_SEEDS, LR, LR_GAMMA,
                     MILESTONES, MOMENTUM, NESTEROV, PAPER_ATTACK_SETTINGS, PAPER_ATTACKS, PAPER_COLUMNS, PAPER_EPS,
                     RELAX, SCHEDULE, TEST_IMAGES_BY_DATASET, TRAIN_IMAGES_BY_DATASET, TRAIN_PGD, VAL_IMAGES,
                     WEIGHT_DECAY)

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


def _on_cuda(configured: Any, recorded: Any) -> bool | None:
    """Whether a stage ran on CUDA: from its configured device when that says (``cpu``, ``mps``, ``cuda[:N]``), else
    from the recorded device name (runtime.device_name: "cpu (...)" off CUDA, the GPU's name on it); None: unknown."""
    if isinstance(configured, str) and configured != "auto":
        return configured.startswith("cuda")
    if isinstance(recorded, str) and recorded.strip():
        return not recorded.startswith("cpu")
    return None


def bf16_in_effect(in_effect: Any, amp: Any, configured_device: Any = None, recorded_device: Any = None) -> bool | None:
    """Whether bf16 autocast ran: the recorded ``amp_in_effect``; for metrics without it, the configured ``amp`` as
    runtime.use_amp resolves it ("auto": on exactly on CUDA). None: "auto" on a device that cannot be told. A
    document that records no amp at all (every train and evaluate has recorded it) counts as fp32."""
    if isinstance(in_effect, bool):
        return in_effect
    if amp == "auto":
        return _on_cuda(configured_device, recorded_device)
    return amp == "bf16"


def _precision(stage: str, bf16: bool | None) -> list[str]:
    if bf16 is None:
        return [f"{stage} amp auto: precision in effect not recorded (bf16 autocast on CUDA, fp32 on CPU)"]
    return [f"bf16 autocast {stage} vs fp32"] if bf16 else []


def noise_active(m: Mapping[str, Any]) -> bool:
    """Whether the evaluated model's noise was on (``noise_active``; documents without it: the configured ``noise``
    of a model that has noise layers, en{k}resnet / en{k}wrn: a plain resnet has none, whatever ``noise`` says)."""
    if "noise_active" in m:
        return bool(m["noise_active"])
    name = str(m.get("model", ""))
    match = RESNET_NAME.match(name) or WRN_NAME.match(name)
    return bool(m.get("noise")) and bool(match and match["k"])


def training_deviations(train: Mapping[str, Any], split: Mapping[str, Any], quantized: bool,
                        method: str, dataset: str = DEFAULT_DATASET, amp_in_effect: bool | None = None,
                        device: str | None = None) -> list[str]:
    """How the training settings in effect differ from the paper's (empty: the paper recipe). ``amp_in_effect``:
    whether bf16 autocast ran (None: not recorded, then ``train.amp`` on ``device``, the recorded device name)."""
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
    out += _precision("training", bf16_in_effect(amp_in_effect, train.get("amp"), train.get("device"), device))
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
    noisy = noise_active(m)
    if noisy and len(seeds) < EVAL_SEEDS:
        out.append(f"{len(seeds)} noise seed(s) vs {EVAL_SEEDS}")
    for key in attacks:
        entry = acc.get(key)
        if entry is None:
            continue
        paper = PAPER_ATTACK_SETTINGS.get(key)
        want = paper["eps"] if paper else PAPER_EPS
        if entry.get("eps") not in (None, want):
            out.append(f"{key} at eps {entry.get('eps')} vs {want}")
        if paper:
            out += attack_deviations(key, entry, noisy)
    settings = m.get("settings") or {}
    out += _precision("evaluation", bf16_in_effect(m.get("amp_in_effect"), settings.get("amp"), settings.get("device"),
                                                   (m.get("provenance") or {}).get("eval_device")))
    return out


def _option(options: Mapping[str, Any], key: str) -> str:
    return repr(options[key]) if key in options else "unset (the function's default)"


def attack_deviations(key: str, entry: Mapping[str, Any], noisy: bool) -> list[str]:
    """How one paper column was run differently from recipe.PAPER_ATTACK_SETTINGS[key]: its function and options
    (``settings``, as configured), the EOT it used (``eot``: 1 on a model without active noise, whatever was asked)
    and whether a noisy model kept its noise on (``noise``, else ``settings.noise``)."""
    want = PAPER_ATTACK_SETTINGS[key]
    name = f"{key} ({PAPER_COLUMNS[key]})"
    settings = entry.get("settings") or {}
    if ("function" not in settings or not isinstance(settings.get("options"), Mapping)
            or not ("noise" in entry or "noise" in settings)):
        return [f"{name} attack settings not recorded: how it was run is unknown"]
    out = []
    if settings["function"] != want["function"]:
        out.append(f"{name} attack {settings['function']} vs {want['function']}")
    have_opts, want_opts = settings["options"], want["options"]
    for opt in sorted(set(have_opts) | set(want_opts), key=str):
        if opt not in have_opts or opt not in want_opts or have_opts[opt] != want_opts[opt]:
            out.append(f"{name} option {opt} {_option(have_opts, opt)} vs {_option(want_opts, opt)}")
    eot = entry.get("eot", settings.get("eot"))
    if eot != want["eot"]:
        out.append(f"{name} EOT {eot} vs {want['eot']}")
    noise_on = entry["noise"] if "noise" in entry else settings["noise"]
    if noisy and bool(noise_on) != want["noise"]:
        on_off = {True: "on", False: "off"}
        out.append(f"{name} with the model's noise {on_off[bool(noise_on)]} vs {on_off[want['noise']]}")
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
                               str(m.get("method")), dataset, training.get("amp_in_effect"),
                               (m.get("provenance") or {}).get("device"))
    if quantized and training and training.get("trained_quantized") is False:
        out.append("no phase-2 epoch: the deployed Q(W) never trained quantized")
    out += evaluation_deviations(m)
    return out
