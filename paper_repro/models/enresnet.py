"""EnResNet: noise after every residual addition, ensembles of members, and ``build(name)``.

Noise (paper-spec section 2): out <- out + sigma * std(out) * N(0, I). With
``noise_std="batch"`` (the reference) std is ONE scalar, the unbiased std of the whole batch
tensor; ``"sample"`` uses one std per example. Gradients flow through std. The noise is on in
training and in evaluation (the reference's randomized defense) unless switched off.

Reproducibility: every ensemble member owns a ``NoiseSource`` whose ``torch.Generator`` is
seeded from ``seed`` and the member index, so members draw different streams and a run repeats
exactly for a fixed seed on a fixed device. The generator is created lazily on the device of
the activations; moving the model to another device (``.to``) therefore restarts each stream
from its seed (so does ``seed_noise``, ``copy.deepcopy`` and pickling).

Every built model is an ``EnResNet`` (plain ``resnet20`` = one member without noise layers),
so parameter names are always ``members.<i>.<layer>...``, e.g. ``members.0.stem.weight``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import RESNET_NAME, VGG_NAME, WRN_NAME
from .resnet import PreActResNet, ResidualHook, blocks_per_stage
from .vgg import vgg_member
from .wrn import wrn_blocks_per_stage, wrn_member

#: (num_classes, after_add hook or None) -> one ensemble member.
MemberFactory = Callable[[int, "ResidualHook | None"], nn.Module]

NOISE_STD_MODES: tuple[str, ...] = ("batch", "sample")
DEFAULT_SIGMA = 0.1
NAME_PATTERNS: tuple[str, ...] = (
    "resnet{depth}  (one member, no noise)",
    "en{k}resnet{depth}  (k >= 1 noisy members, logits averaged)",
    "depth = 6n+2, e.g. 20, 32, 44, 56, 110",
    "wrn{6n+4}-{widen} / en{k}wrn{6n+4}-{widen}  (WideResNet, e.g. wrn34-10, en5wrn34-10)",
    "vgg11 | vgg13 | vgg16 | vgg19  (no noise)",
)
_NAME_RE, _WRN_RE, _VGG_RE = RESNET_NAME, WRN_NAME, VGG_NAME  # the grammar lives in config
PAPER_NAMES: tuple[str, ...] = (
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "en1resnet20", "en2resnet20", "en5resnet20",
    "en1resnet56", "en2resnet56", "en1resnet110",
    "wrn34-10", "en5wrn34-10", "vgg11",
)


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one stream (e.g. member i's noise); stable across runs and platforms."""
    text = ":".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def _check_std_mode(mode: str) -> str:
    if mode not in NOISE_STD_MODES:
        raise ValueError(f"noise_std must be one of {NOISE_STD_MODES}, got {mode!r}")
    return mode


class NoiseSource:
    """Settings and seeded generator shared by the noise layers of one member (not a module)."""

    def __init__(self, seed: int, sigma: float, std_mode: str, enabled: bool):
        self.seed = int(seed)
        self.sigma = float(sigma)
        self.std_mode = _check_std_mode(std_mode)
        self.enabled = bool(enabled)
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The stream's generator on ``device``, (re)created from the seed when the device changes."""
        g = self._generator
        if g is None or g.device != device:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generator = g
        return g

    def reseed(self, seed: int) -> None:
        self.seed = int(seed)
        self._generator = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_generator"] = None  # generators are device objects; recreate from the seed
        return state

    def __deepcopy__(self, memo: dict) -> "NoiseSource":
        copy = NoiseSource(self.seed, self.sigma, self.std_mode, self.enabled)
        memo[id(self)] = copy  # the member's layers keep sharing one source in the copy
        return copy


def _noise_scale(out: torch.Tensor, sigma: float, std_mode: str) -> torch.Tensor:
    """sigma * std(out) in fp32 (bf16 std over a large tensor is too coarse), shaped to broadcast."""
    flat = out.float()
    if std_mode == "batch":
        return sigma * flat.std()
    return sigma * flat.flatten(1).std(dim=1).view(-1, *([1] * (out.dim() - 1)))


class ResidualNoise(nn.Module):
    """out + sigma * std(out) * N(0, I), drawn from the member's own generator."""

    def __init__(self, source: NoiseSource):
        super().__init__()
        self.source = source

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        src = self.source
        if not src.enabled or src.sigma == 0.0:
            return out
        z = torch.randn(out.shape, generator=src.generator(out.device), device=out.device, dtype=out.dtype)
        return out + _noise_scale(out, src.sigma, src.std_mode).to(out.dtype) * z

    def extra_repr(self) -> str:
        return f"sigma={self.source.sigma}, std={self.source.std_mode!r}"


class EnResNet(nn.Module):
    """k pre-activation ResNets trained jointly; the output is the mean of the members' logits."""

    arch: str
    arch_config: dict[str, Any]

    def __init__(
        self,
        depth: int,
        members: int,
        num_classes: int = 10,
        *,
        noisy: bool,
        noise: bool = True,
        sigma: float = DEFAULT_SIGMA,
        noise_std: str = "batch",
        seed: int = 0,
        make_member: MemberFactory | None = None,
    ):
        super().__init__()
        if members < 1:
            raise ValueError(f"an ensemble needs at least one member, got {members}")
        self._sources = [
            NoiseSource(derive_seed(seed, "noise", i), sigma, noise_std, noise) for i in range(members)
        ] if noisy else []
        nets = []
        for i in range(members):
            hook = (lambda src=self._sources[i]: ResidualNoise(src)) if noisy else None
            nets.append(make_member(num_classes, hook) if make_member is not None
                        else PreActResNet(depth, num_classes, after_add=hook))
        self.members = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for member in self.members[1:]:
            out = out + member(x)
        return out / len(self.members)

    @property
    def has_noise(self) -> bool:
        """Whether the architecture has noise layers at all (False for plain resnet{depth})."""
        return bool(self._sources)

    @property
    def noise_enabled(self) -> bool:
        return any(s.enabled for s in self._sources)

    @property
    def noise_std(self) -> str | None:
        return self._sources[0].std_mode if self._sources else None

    def set_noise(self, enabled: bool) -> "EnResNet":
        """Switch the noise on or off (a no-op for architectures without noise layers)."""
        for s in self._sources:
            s.enabled = bool(enabled)
        return self

    def set_noise_std(self, mode: str) -> "EnResNet":
        """'batch' (reference: one std over the batch tensor) or 'sample' (one std per example)."""
        _check_std_mode(mode)
        for s in self._sources:
            s.std_mode = mode
        return self

    def noise_generators(self) -> list[torch.Generator]:
        """The generators the noise layers made since the last reseed (a CUDA graph of the step registers them)."""
        return [s._generator for s in self._sources if s._generator is not None]

    def seed_noise(self, seed: int) -> "EnResNet":
        """Restart every member's noise stream from ``seed`` (members still get distinct streams)."""
        for i, s in enumerate(self._sources):
            s.reseed(derive_seed(seed, "noise", i))
        return self


def parse_name(name: str) -> tuple[int, int, bool]:
    """'en2resnet56' -> (members=2, depth=56, noisy=True); 'resnet20' -> (1, 20, False)."""
    m = _NAME_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown model name {name!r}; valid patterns: " + "; ".join(NAME_PATTERNS))
    depth = int(m["depth"])
    try:
        blocks_per_stage(depth)
    except ValueError as err:
        raise ValueError(f"model name {name!r}: {err}; valid patterns: " + "; ".join(NAME_PATTERNS)) from None
    k = m["k"]
    return (int(k), depth, True) if k is not None else (1, depth, False)


@dataclass(frozen=True)
class Arch:
    """A parsed model name: family (resnet | wrn | vgg), members, depth, widen factor, noise layers."""
    family: str
    members: int
    depth: int
    widen: int
    noisy: bool

    def member_factory(self) -> MemberFactory | None:
        if self.family == "wrn":
            return wrn_member(self.depth, self.widen)
        if self.family == "vgg":
            return vgg_member(self.depth)
        return None


def parse_arch(name: str) -> Arch:
    """Any buildable name: 'en5wrn34-10' -> Arch('wrn', 5, 34, 10, True); 'vgg11' -> Arch('vgg', 1, 11, 1, False)."""
    w = _WRN_RE.match(name) if isinstance(name, str) else None
    v = _VGG_RE.match(name) if isinstance(name, str) else None
    try:
        if w is not None:
            wrn_blocks_per_stage(int(w["depth"]))
            k = w["k"]
            return Arch("wrn", int(k) if k else 1, int(w["depth"]), int(w["widen"]), k is not None)
        if v is not None:
            from .vgg import CONFIGS

            if int(v["depth"]) not in CONFIGS:
                raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}")
            return Arch("vgg", 1, int(v["depth"]), 1, False)
    except ValueError as err:
        raise ValueError(f"model name {name!r}: {err}; valid patterns: " + "; ".join(NAME_PATTERNS)) from None
    members, depth, noisy = parse_name(name)
    return Arch("resnet", members, depth, 1, noisy)


def names() -> tuple[str, ...]:
    """The architectures named in the paper and its references (any en{k}resnet{6n+2} builds)."""
    return PAPER_NAMES


def build(
    name: str,
    num_classes: int = 10,
    *,
    noise: bool = True,
    sigma: float = DEFAULT_SIGMA,
    noise_std: str = "batch",
    seed: int = 0,
) -> EnResNet:
    """Build ``name`` with weights initialised from ``seed`` (global RNG untouched) and noise seeded from it.

    ``noise`` is the initial on/off state of an en* model's noise (no effect on plain resnets);
    ``model.arch_config`` holds the effective keyword arguments, so
    ``build(model.arch, **model.arch_config)`` rebuilds the same architecture.
    """
    arch = parse_arch(name)
    members, depth, noisy = arch.members, arch.depth, arch.noisy
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not sigma >= 0.0:
        raise ValueError(f"sigma must be >= 0, got {sigma!r}")
    _check_std_mode(noise_std)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        model = EnResNet(
            depth, members, num_classes,
            noisy=noisy, noise=noise, sigma=sigma, noise_std=noise_std, seed=seed,
            make_member=arch.member_factory(),
        )
    model.arch = name
    model.arch_config = {
        "num_classes": num_classes,
        "noise": bool(noise) and noisy,
        "sigma": float(sigma),
        "noise_std": noise_std,
        "seed": seed,
    }
    return model
