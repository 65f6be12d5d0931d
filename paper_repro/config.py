"""Typed, validated settings read from params.yaml.

Every section is a frozen dataclass; loading rejects unknown keys, wrong types and out-of-range
values with one line naming the key (``params.yaml: train.epochs must be >= 1, got -3``), so a bad
setting fails before any work starts rather than hours into a run.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import recipe

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


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names the key."""


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataSettings:
    archive: str = "data/cifar-10-python.tar.gz"
    url: str = OFFICIAL_URL
    md5: str | None = OFFICIAL_MD5
    prepared: str = "data/prepared"
    train_limit: int | None = None
    test_limit: int | None = None
    expect_counts: list[int] | None = dataclasses.field(default_factory=lambda: [50000, 10000])
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
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"

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
        self.pgd.validate(f"{at}.pgd")
        self.val_attack.validate(f"{at}.val_attack")
        self.relax.validate(f"{at}.relax")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device) is not None,
               f"{at}.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")


@dataclass(frozen=True)
class EvalAttack:
    """One evaluation attack: ``attack`` names a function of paper_repro.attacks (or "natural"),
    ``options`` are its extra keyword arguments (checked against its signature when evaluate starts).

    Paper attacks run at ``eps``; audit attacks run once per ``evaluate.audit_eps`` (their ``eps``
    is ignored). ``noise: false`` switches a noisy model's noise off for this attack and its scoring;
    ``noisy_only`` skips the attack (saying so) on a model without active noise. ``eot`` is the
    number of noise draws averaged per gradient (1 on a model without active noise).
    """
    attack: str
    eps: float = recipe.PAPER_EPS
    options: dict[str, Any] = field(default_factory=dict)
    eot: int = 1
    noise: bool = True
    noisy_only: bool = False
    paper_column: str | None = None
    label: str | None = None
    n_examples: int | None = None  # test images for this attack (null: evaluate.n_examples / audit_examples)

    NAMES: typing.ClassVar[tuple[str, ...]] = (
        "natural", "fgsm", "ifgsm20", "pgd", "cw_ref", "cw_linf", "autoattack")

    def validate(self, at: str) -> None:
        _check(self.attack in self.NAMES, f"{at}.attack must be one of {self.NAMES}, got {self.attack!r}")
        _check(0 <= self.eps <= 1, f"{at}.eps must be in [0, 1], got {self.eps}")
        _check(self.eot >= 1, f"{at}.eot must be >= 1, got {self.eot}")
        _positive_or_none(self.n_examples, f"{at}.n_examples")
        for key in ("eps", "eot", "generator", "seed", "model", "x", "y"):
            _check(key not in self.options, f"{at}.options.{key} is set by the evaluation itself; remove it")


@dataclass(frozen=True)
class EvaluateSettings:
    """Evaluation of one run; the defaults are the paper profile (full 10k test set, 5 noise seeds).

    The first ``n_examples`` / ``audit_examples`` / ``sanity_examples`` test images are used (null:
    all). ``attacks`` and ``audit_attacks`` replace the defaults as a whole when given.
    ``audit_seeds`` null = ``seeds``. Sanity checks (gradient masking, Carlini et al. 2019) run on
    one seed: PGD with ``sanity_steps`` at ``sanity_eps[0]``, an eps sweep with max(sanity_steps)
    steps (step 2.5 eps / steps), Square with ``square_queries`` and a transfer from the float twin.
    """

    @staticmethod
    def paper_attacks() -> dict[str, EvalAttack]:
        """The paper's columns A1-A4 (paper-spec section 6; the column names are recipe.PAPER_COLUMNS)."""
        col = recipe.PAPER_COLUMNS
        return {
            "natural": EvalAttack("natural", eps=0.0, paper_column=col["natural"], label="natural (clean) accuracy"),
            "fgsm": EvalAttack("fgsm", eps=recipe.PAPER_EPS, paper_column=col["fgsm"], label="FGSM, one sign step"),
            "ifgsm20": EvalAttack("ifgsm20", eps=recipe.PAPER_EPS, paper_column=col["ifgsm20"],
                                  label="IFGSM20: 20 steps of 1/255, no random start"),
            # Reference quirk kept as the default because it produced the reported A4 numbers: under
            # PyTorch 0.4 the reference's w, x and the rescaled image share storage ("aliased").
            "cw_ref": EvalAttack("cw_ref", eps=recipe.PAPER_EPS, paper_column=col["cw_ref"],
                                 options={"variant": "aliased"},
                                 label="C&W, the reference variant (not standard Carlini-Wagner; unclamped; "
                                       "reference aliasing of w and x reproduced)"),
        }

    @staticmethod
    def audit_defaults() -> dict[str, EvalAttack]:
        """What a reviewer asks of a randomized, quantized defense (run at each evaluate.audit_eps)."""
        return {
            "pgd50_eot": EvalAttack("pgd", options={"steps": 50, "step": 1 / 255, "restarts": 3,
                                                    "random_start": True},
                                    eot=10, label="PGD-50 (step 1/255, 3 restarts, EOT 10 over the noise)"),
            "cw_linf": EvalAttack("cw_linf", options={"steps": 50, "step": 1 / 255, "restarts": 1}, eot=10,
                                  label="CW-Linf: PGD-50 on the margin loss, EOT 10"),
            "autoattack_rand": EvalAttack("autoattack", options={"version": "rand", "steps": 100}, noisy_only=True,
                                          label="AutoAttack rand (APGD-CE + APGD-DLR, EOT 20), noise on"),
            "autoattack_standard_noise_off": EvalAttack(
                "autoattack", options={"version": "standard", "steps": 100}, noise=False,
                label="AutoAttack standard on the same weights with the noise switched off"),
        }

    @staticmethod
    def check_seeds(seeds: list[int], key: str) -> None:
        _check(len(seeds) >= 1, f"{key} must list at least one seed")
        _check(all(s >= 0 for s in seeds) and len(set(seeds)) == len(seeds),
               f"{key} must be distinct seeds >= 0, got {seeds}")

    n_examples: int | None = recipe.TEST_IMAGES
    batch_size: int = 500
    seeds: list[int] = field(default_factory=lambda: list(range(recipe.EVAL_SEEDS)))
    attacks: dict[str, EvalAttack] = field(default_factory=paper_attacks)
    audit: bool = True
    audit_examples: int | None = 1000
    audit_seeds: list[int] | None = None
    audit_eps: list[float] = field(default_factory=lambda: [recipe.PAPER_EPS, 8 / 255])
    audit_attacks: dict[str, EvalAttack] = field(default_factory=audit_defaults)
    sanity: bool = True
    sanity_examples: int | None = 500
    sanity_seed: int = 0
    sanity_eps: list[float] = field(default_factory=lambda: [recipe.PAPER_EPS, 0.1, 0.3, 1.0])
    sanity_steps: list[int] = field(default_factory=lambda: [10, 50, 100])
    sanity_eot: int = 1
    sanity_zero_acc: float = 2.0
    sanity_tolerance: float = 1.0
    square_queries: int = 1000
    export_packed: bool = False
    device: str = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"

    def validate(self, at: str) -> None:
        _positive_or_none(self.n_examples, f"{at}.n_examples")
        _positive_or_none(self.audit_examples, f"{at}.audit_examples")
        _positive_or_none(self.sanity_examples, f"{at}.sanity_examples")
        _check(self.batch_size >= 1, f"{at}.batch_size must be >= 1, got {self.batch_size}")
        self.check_seeds(self.seeds, f"{at}.seeds")
        if self.audit_seeds is not None:
            self.check_seeds(self.audit_seeds, f"{at}.audit_seeds")
        _check(self.sanity_seed >= 0, f"{at}.sanity_seed must be >= 0, got {self.sanity_seed}")
        _check(len(self.attacks) >= 1, f"{at}.attacks must list at least one attack")
        for name, a in [*self.attacks.items(), *self.audit_attacks.items()]:
            where = f"{at}.{'attacks' if name in self.attacks else 'audit_attacks'}.{name}"
            _check(re.fullmatch(r"[A-Za-z0-9_.+-]+", name) is not None,
                   f"{where}: attack names use letters, digits and _.+- only")
            a.validate(where)
        both = sorted(set(self.attacks) & set(self.audit_attacks))
        _check(not both, f"{at}.audit_attacks.{both[0] if both else ''} is also in {at}.attacks; rename one")
        _check(len(self.audit_eps) >= 1 and all(0 < e <= 1 for e in self.audit_eps),
               f"{at}.audit_eps must list eps values in (0, 1], got {self.audit_eps}")
        _check(len(set(self.audit_eps)) == len(self.audit_eps), f"{at}.audit_eps has duplicates: {self.audit_eps}")
        _check(len(self.sanity_eps) >= 2 and all(0 < e <= 1 for e in self.sanity_eps)
               and list(self.sanity_eps) == sorted(set(self.sanity_eps)),
               f"{at}.sanity_eps must be >= 2 increasing eps values in (0, 1], got {self.sanity_eps}")
        _check(len(self.sanity_steps) >= 2 and self.sanity_steps[0] >= 1
               and list(self.sanity_steps) == sorted(set(self.sanity_steps)),
               f"{at}.sanity_steps must be >= 2 increasing step counts >= 1, got {self.sanity_steps}")
        _check(self.sanity_eot >= 1, f"{at}.sanity_eot must be >= 1, got {self.sanity_eot}")
        _check(0 <= self.sanity_zero_acc <= 100,
               f"{at}.sanity_zero_acc must be in [0, 100] (%), got {self.sanity_zero_acc}")
        _check(self.sanity_tolerance >= 0, f"{at}.sanity_tolerance must be >= 0 (points), got {self.sanity_tolerance}")
        _check(self.square_queries >= 1, f"{at}.square_queries must be >= 1, got {self.square_queries}")
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
class StrictLoader(yaml.SafeLoader):
    """YAML for params: a repeated key is an error (PyYAML keeps the last one silently), and floats follow
    YAML 1.2 (``1e6`` and ``5e-4`` are numbers; PyYAML's YAML 1.1 rules read them as strings)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (lines {seen[key]} and {key_node.start_mark.line + 1})")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """``text`` read with StrictLoader (ConfigError for duplicate keys, as for invalid YAML)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass


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
        _apply_override(raw, item)
    return from_dict(raw, origin=str(path))


def from_dict(raw: dict[str, Any], origin: str = "params") -> Settings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        raw = _experiments_as_list(raw)
        settings = _build(Settings, raw, "")
        settings.validate("")
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    return settings


def _experiments_as_list(raw: dict[str, Any]) -> dict[str, Any]:
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


def to_dict(obj: Any) -> Any:
    """Settings -> plain JSON-serialisable dict (for sidecars and provenance)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, value = item.split("=", 1)
    node = raw
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
    try:
        node[keys[-1]] = parse_yaml(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: not valid YAML ({e.__class__.__name__})") from None


def _build(cls: type, raw: Any, path: str) -> Any:
    """Dict -> dataclass ``cls``; ``path`` is the dotted key prefix used in error messages."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'settings'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown key {_join(path, unknown[0])} (allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[f.name], _join(path, f.name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {_join(path, f.name)}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} must not be null")
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {tp}")  # pragma: no cover - programming error


def _known_model(name: str) -> bool:
    """The names paper_repro.models.build accepts (checked here without importing torch)."""
    m, w, v = RESNET_NAME.match(name), WRN_NAME.match(name), VGG_NAME.match(name)
    if m is not None:
        return (int(m["depth"]) - 2) % 6 == 0 and int(m["depth"]) >= 8
    if w is not None:
        return (int(w["depth"]) - 4) % 6 == 0 and int(w["depth"]) >= 10
    return v is not None and int(v["depth"]) in VGG_DEPTHS


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_or_none(value: int | None, key: str) -> None:
    _check(value is None or value >= 1, f"{key} must be >= 1 or null, got {value}")
