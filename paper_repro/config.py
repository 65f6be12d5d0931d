"""Typed, validated settings read from params.yaml.

Every section is a frozen dataclass; loading rejects unknown keys, wrong types and out-of-range
values with one line naming the key (``params.yaml: train.epochs must be >= 1, got -3``), so a bad
setting fails before any work starts rather than hours into a run. The reading rules live in typed_yaml.py,
the ``evaluate`` section in evaluation_settings.py (both re-exported here: ``config.EvaluateSettings``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import recipe
from .evaluation_settings import EvalAttack, EvaluateSettings
from .typed_yaml import (ConfigError, StrictLoader, apply_override, build, check as _check, parse_yaml,
                         positive_or_none as _positive_or_none, to_dict)

__all__ = ["ConfigError", "StrictLoader", "parse_yaml", "to_dict", "EvalAttack", "EvaluateSettings", "Settings",
           "Experiment", "DataSettings", "TrainSettings", "AttackSettings", "RelaxSettings", "load", "from_dict"]

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_ENV = "CIFAR10_ARCHIVE"

#: The model-name grammar (one home: config checks names at load, models.build parses them, checks reads
#: the ensemble size): [en<k>]resnet<depth>, [en<k>]wrn<depth>-<widen> (the authors' wider grid: TRADES /
#: EnResNet WRN-34-10) and vgg<depth> (the BinaryRelax demo).
RESNET_NAME = re.compile(r"^(?:en(?P<k>[1-9][0-9]*))?resnet(?P<depth>[0-9]+)$")
WRN_NAME = re.compile(r"^(?:en(?P<k>[1-9][0-9]*))?wrn(?P<depth>[0-9]+)-(?P<widen>[1-9][0-9]*)$")
VGG_NAME = re.compile(r"^vgg(?P<depth>[0-9]+)$")
VGG_DEPTHS = (11, 13, 16, 19)
QUANTIZERS = ("none", "binary", "ternary", "4bit", "kbit")
#: Options each quantizer takes, with their defaults (None: required). quant.quantizers checks with these.
QUANTIZER_OPTIONS: dict[str, dict[str, Any]] = {"none": {}, "binary": {}, "4bit": {}, "ternary": {"scale": "ref"},
                                                "kbit": {"bits": None}}
TERNARY_SCALES = ("ref", "twn")
KBIT_MIN, KBIT_MAX = 2, 8
LOSSES = ("natural", "pgd_at", "tradeoff", "trades")
PROFILES = ("paper", "gpu", "cpu", "smoke", "test")



# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataSettings:
    archive: str = "data/cifar-10-python.tar.gz"
    url: str = OFFICIAL_URL
    md5: str | None = OFFICIAL_MD5
    prepared: str = "data/prepared"
    train_limit: int | None = None
    test_limit: int | None = None
    expect_counts: list[int] | None = field(default_factory=lambda: [50000, 10000])
    val_size: int = recipe.VAL_IMAGES
    split_seed: int = 0
    dataset: str = recipe.DEFAULT_DATASET   # the profile's dataset; an experiment may name another

    def validate(self, at: str) -> None:
        _check(self.dataset in recipe.DATASETS, f"{at}.dataset must be one of {list(recipe.DATASETS)}, "
                                                f"got {self.dataset!r}")
        _check(self.dataset == "cifar10" or self.md5 != OFFICIAL_MD5,
               f"{at}.md5 is the CIFAR-10 archive's md5 but {at}.dataset is {self.dataset!r}: set the "
               f"{self.dataset} source's md5 (or null) with its archive and url")
        _positive_or_none(self.train_limit, f"{at}.train_limit")
        _positive_or_none(self.test_limit, f"{at}.test_limit")
        _check(self.val_size >= 0, f"{at}.val_size must be >= 0, got {self.val_size}")
        if self.md5 is not None:
            _check(re.fullmatch(r"[0-9a-f]{32}", self.md5) is not None,
                   f"{at}.md5 must be 32 lowercase hex digits, got {self.md5!r}")
        if self.expect_counts is not None:
            _check(len(self.expect_counts) == 2 and all(c > 0 for c in self.expect_counts),
                   f"{at}.expect_counts must be [train, test] positive counts or null")
        if self.train_limit is not None:
            _check(self.val_size < self.train_limit,
                   f"{at}.val_size ({self.val_size}) must be smaller than {at}.train_limit ({self.train_limit})")


@dataclass(frozen=True)
class AttackSettings:
    """An L-infinity PGD-style attack: eps and step in pixel units of [0,1] images (default: the paper's
    training attack)."""
    eps: float = recipe.TRAIN_PGD["eps"]
    step: float = recipe.TRAIN_PGD["step"]
    steps: int = recipe.TRAIN_PGD["steps"]
    random_start: bool = recipe.TRAIN_PGD["random_start"]

    def validate(self, at: str) -> None:
        _check(0 < self.eps <= 1, f"{at}.eps must be in (0, 1], got {self.eps}")
        _check(0 < self.step <= 1, f"{at}.step must be in (0, 1], got {self.step}")
        _check(self.steps >= 1, f"{at}.steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class RelaxSettings:
    """BinaryRelax schedule: eta0 grows by rho each epoch until hard_epoch (phase 2: pure Q(W))."""
    eta0: float = recipe.RELAX["eta0"]
    rho: float = recipe.RELAX["rho"]
    hard_epoch: int = recipe.RELAX["hard_epoch"]

    def validate(self, at: str) -> None:
        _check(self.eta0 > 0, f"{at}.eta0 must be > 0, got {self.eta0}")
        _check(self.rho >= 1, f"{at}.rho must be >= 1, got {self.rho}")
        _check(self.hard_epoch >= 0, f"{at}.hard_epoch must be >= 0, got {self.hard_epoch}")


#: train.compile: none, or a torch.compile mode; the last two make CUDA graphs of their own
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]
GRAPHING_COMPILE_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = recipe.EPOCHS
    batch_size: int = recipe.BATCH_SIZE
    lr: float = recipe.LR
    momentum: float = recipe.MOMENTUM
    nesterov: bool = recipe.NESTEROV
    weight_decay: float = recipe.WEIGHT_DECAY
    milestones: list[int] = field(default_factory=lambda: list(recipe.MILESTONES))
    lr_gamma: float = recipe.LR_GAMMA
    schedule: Literal["step", "onecycle"] = recipe.SCHEDULE   # step: x lr_gamma at milestones (paper); onecycle: see lr_at
    onecycle_peak: float = 0.25                       # onecycle: fraction of training spent warming up to lr
    augment: bool = recipe.AUGMENT
    pgd: AttackSettings = field(default_factory=AttackSettings)
    relax: RelaxSettings = field(default_factory=RelaxSettings)
    val_attack: AttackSettings = field(default_factory=AttackSettings)
    val_examples: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: bool = True
    #: torch.compile of the network: none, or a torch.compile mode; reduce-overhead adds CUDA graphs (the GPU
    #: bench's 4.2x on a ResNet20 PGD-10 step). An execution setting: a resume may change it.
    compile: CompileMode = "none"
    #: on CUDA, capture each epoch's training step whole (attack, loss, backward, SGD) as one CUDA graph and
    #: replay it (paper_repro/step_graph.py); ignored, with a note, on other devices. An execution setting.
    cuda_graph: bool = False
    #: on CUDA, let cuDNN time its convolution algorithms for each new shape and keep the fastest
    #: (torch.backends.cudnn.benchmark); the training batch shape is fixed, so this is paid once. An execution setting.
    cudnn_benchmark: bool = True

    def validate(self, at: str) -> None:
        _check(self.epochs >= 1, f"{at}.epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{at}.batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"{at}.lr must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, f"{at}.momentum must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, f"{at}.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 < self.lr_gamma <= 1, f"{at}.lr_gamma must be in (0, 1], got {self.lr_gamma}")
        _check(list(self.milestones) == sorted(self.milestones) and all(m >= 1 for m in self.milestones),
               f"{at}.milestones must be increasing epochs >= 1, got {self.milestones}")
        _check(0 < self.onecycle_peak < 1, f"{at}.onecycle_peak must be in (0, 1), got {self.onecycle_peak}")
        _check(self.relax.hard_epoch <= self.epochs,
               f"{at}.relax.hard_epoch ({self.relax.hard_epoch}) must be <= {at}.epochs ({self.epochs})")
        _positive_or_none(self.val_examples, f"{at}.val_examples")
        _check(not (self.cuda_graph and self.compile in GRAPHING_COMPILE_MODES),
               f"{at}.cuda_graph captures the whole step as one CUDA graph and {at}.compile {self.compile} makes "
               f"CUDA graphs of its own: use compile none or default with it")
        self.pgd.validate(f"{at}.pgd")
        self.val_attack.validate(f"{at}.val_attack")
        self.relax.validate(f"{at}.relax")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device) is not None,
               f"{at}.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass(frozen=True)
class Experiment:
    """One training configuration of the experiment list: (model, quantizer, method, loss)."""
    name: str
    model: str
    quantizer: str = "none"
    method: Literal["BR", "BC"] = "BR"
    loss: str = "pgd_at"
    loss_params: dict[str, float] = field(default_factory=dict)
    quantizer_options: dict[str, Any] = field(default_factory=dict)
    noise: bool = True
    dataset: str | None = None   # null: the profile's data.dataset
    #: The float twin whose model the transfer check attacks (the profiles write float_twin's answer; a test keeps
    #: them equal); the name itself when the run is full precision or has none; null: float_twin decides. Written
    #: out because dvc.yaml declares runs/<twin> a dependency of evaluate@<name> (retraining the twin reruns the
    #: check). Overrides that change a model keep the named twin. Not part of the training.
    twin: str | None = None

    def validate(self, at: str) -> None:
        _check(re.fullmatch(r"[A-Za-z0-9_.@=+-]+", self.name) is not None,
               f"{at}.name must use letters, digits and _.@=+- only, got {self.name!r}")
        _check(_known_model(self.model),
               f"{at}.model: unknown model {self.model!r} (expected resnet<6n+2>, en<k>resnet<6n+2>, "
               f"wrn<6n+4>-<widen>, en<k>wrn<6n+4>-<widen> or vgg11/13/16/19, e.g. resnet20, en2resnet20, "
               f"en1resnet56, en5wrn34-10, vgg11)")
        _check(self.dataset is None or self.dataset in recipe.DATASETS,
               f"{at}.dataset must be one of {list(recipe.DATASETS)} or null, got {self.dataset!r}")
        _check(self.quantizer in QUANTIZERS, f"{at}.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        try:
            quantizer_options(self.quantizer, self.quantizer_options)
        except ValueError as e:
            raise ConfigError(f"{at}.quantizer_options: {e}") from None
        _check(self.loss in LOSSES, f"{at}.loss must be one of {LOSSES}, got {self.loss!r}")
        for key, value in self.loss_params.items():
            _check(key in LOSS_PARAM_KEYS[self.loss],
                   f"{at}.loss_params.{key} is not a parameter of loss {self.loss!r} "
                   f"(allowed: {sorted(LOSS_PARAM_KEYS[self.loss]) or 'none'})")
            _check(float(value) >= 0, f"{at}.loss_params.{key} must be >= 0, got {value}")

    @property
    def quantized(self) -> bool:
        return self.quantizer != "none"

    def resolved_loss_params(self) -> dict[str, float]:
        return {**LOSS_DEFAULTS[self.loss], **{k: float(v) for k, v in self.loss_params.items()}}


LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "natural": {},
    "pgd_at": {},
    "tradeoff": dict(recipe.TRADEOFF_WEIGHTS),
    "trades": {"beta": recipe.TRADES_BETA},
}
LOSS_PARAM_KEYS = {k: set(v) for k, v in LOSS_DEFAULTS.items()}


@dataclass(frozen=True)
class Settings:
    profile: str = "paper"
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    experiments: list[Experiment] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def validate(self, at: str = "") -> None:
        _check(self.profile in PROFILES, f"profile must be one of {PROFILES}, got {self.profile!r}")
        self.data.validate("data")
        self.train.validate("train")
        self.evaluate.validate("evaluate")
        names = [e.name for e in self.experiments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _check(not dupes, f"experiments: duplicate names {dupes}")
        for e in self.experiments:
            e.validate(f"experiments.{e.name}")
            floats = {x.name for x in self.experiments if not x.quantized}
            _check(e.twin is None or e.twin == e.name or e.twin in floats,
                   f"experiments.{e.name}.twin must be the name of a full-precision experiment or {e.name!r} itself, "
                   f"got {e.twin!r} (the profiles write config.float_twin there: tests/test_params.py)")

    def experiment(self, name: str) -> Experiment:
        for e in self.experiments:
            if e.name == name:
                return e
        known = ", ".join(e.name for e in self.experiments) or "none"
        raise ConfigError(f"unknown experiment {name!r}; params.yaml lists: {known}")


def float_twin(experiments: list[Experiment], experiment: Experiment) -> str:
    """The name of ``experiment``'s float twin (same model, loss, loss weights and noise, quantizer none), or
    its own name when it is full precision or has none."""
    if not experiment.quantized:
        return experiment.name
    for e in experiments:
        if (e.name != experiment.name and not e.quantized and e.model == experiment.model and e.loss == experiment.loss
                and e.noise == experiment.noise and e.dataset == experiment.dataset
                and e.resolved_loss_params() == experiment.resolved_loss_params()):
            return e.name
    return experiment.name


def changed_options(experiment: Experiment) -> dict[str, dict[str, Any]]:
    """``loss_params`` and ``quantizer_options`` in effect, less the entries equal to their defaults (how the
    training trajectory records them: writing a default out changes no run)."""
    loss_defaults = LOSS_DEFAULTS[experiment.loss]
    option_defaults = QUANTIZER_OPTIONS[experiment.quantizer]
    return {"loss_params": {k: v for k, v in experiment.resolved_loss_params().items() if loss_defaults.get(k) != v},
            "quantizer_options": {k: v for k, v in quantizer_options(experiment.quantizer,
                                                                     experiment.quantizer_options).items()
                                  if option_defaults.get(k) != v}}


def quantizer_options(scheme: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """A scheme's options with defaults filled in; ValueError naming what is wrong (unknown scheme or option,
    a bad value). Torch-free so that params are checked at load, not when training starts."""
    scheme = "none" if scheme is None else scheme
    if scheme not in QUANTIZER_OPTIONS:
        raise ValueError(f"unknown quantizer scheme {scheme!r}; expected one of {QUANTIZERS}")
    allowed = QUANTIZER_OPTIONS[scheme]
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"scheme {scheme!r} takes options {sorted(allowed)}, got unknown {sorted(unknown)}")
    out = {**allowed, **options}
    if scheme == "ternary" and out["scale"] not in TERNARY_SCALES:
        raise ValueError(f"ternary scale must be one of {TERNARY_SCALES}, got {out['scale']!r}")
    if scheme == "kbit":
        bits = out["bits"]
        if not isinstance(bits, int) or isinstance(bits, bool) or not KBIT_MIN <= bits <= KBIT_MAX:
            raise ValueError(f"kbit needs an integer bits in [{KBIT_MIN}, {KBIT_MAX}], got {bits!r}")
    return out


# --------------------------------------------------------------------------- loading
def load(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Settings:
    """Read params.yaml (plus ``key.sub=value`` overrides) into validated Settings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: settings file not found (run from the project root or pass --params)")
    try:
        raw = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {e})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw, origin=str(path))


def from_dict(raw: dict[str, Any], origin: str = "params") -> Settings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        raw = experiments_as_list(raw)
        settings = build(Settings, raw, "")
        settings.validate("")
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    return settings


def experiments_as_list(raw: dict[str, Any]) -> dict[str, Any]:
    """params.yaml keeps experiments as a mapping name -> settings (DVC's foreach names stages by key)."""
    experiments = (raw or {}).get("experiments")
    if experiments is None or isinstance(experiments, list):
        return raw
    if not isinstance(experiments, dict):
        raise ConfigError(f"experiments must be a mapping of name -> settings, got {type(experiments).__name__}")
    listed = []
    for name, spec in experiments.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"experiments.{name} must be a mapping, got {type(spec).__name__}")
        if "name" in spec:
            raise ConfigError(f"experiments.{name}: the key is the name; remove 'name'")
        listed.append({"name": str(name), **spec})
    return {**raw, "experiments": listed}


def _known_model(name: str) -> bool:
    """The names paper_repro.models.build accepts (checked here without importing torch)."""
    m, w, v = RESNET_NAME.match(name), WRN_NAME.match(name), VGG_NAME.match(name)
    if m is not None:
        return (int(m["depth"]) - 2) % 6 == 0 and int(m["depth"]) >= 8
    if w is not None:
        return (int(w["depth"]) - 4) % 6 == 0 and int(w["depth"]) >= 10
    return v is not None and int(v["depth"]) in VGG_DEPTHS
