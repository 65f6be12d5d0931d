"""K independent (En)ResNets computed as ONE network with grouped convolutions.

Why: a ResNet20 step at batch 128 is thousands of small kernels, and a GPU idles between launches.
Stacking G networks side by side as channel groups (``groups=G`` in every conv) makes each kernel do
G times the work for the same launch count. The same mechanism computes the members of an En_k
ensemble in one pass: every *member* (one PreActResNet) is one group, and a model's logits are the
mean of its members' logits, as in ``EnResNet.forward``.

Equivalence with the separate models (tests/test_stacked.py proves it on CPU, within float tolerance):
- a grouped conv is one conv per group; BatchNorm is per channel, so its statistics never mix groups;
- the EnResNet noise of each member uses the std of that member's own tensor (one scalar per member
  for ``noise_std="batch"``, one per example and member for ``"sample"``) and is drawn from that
  member's own generator with the member's own tensor shape, so every member sees the very stream it
  would see alone; ``seed_noise`` reseeds each model exactly as ``EnResNet.seed_noise`` does;
- each member has its own fc (a batched matmul).

Interface: ``forward`` takes the K models' batches concatenated along the batch dimension,
``(K*B, 3, H, W)`` (model i's images are rows i*B..(i+1)*B), and returns ``(K*B, classes)`` in the same
order, so the attacks of ``paper_repro.attacks`` and a per-model loss work on it unchanged.
Parameters of the stacked network concatenate the members' tensors along dim 0 (fc: stacked), so
``stack_state_dicts``/``unstack_state_dict`` convert both ways without touching values.

This module is deliberately outside ``paper_repro/models`` (a DVC dependency of every training stage):
adding it changes no existing stage.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import build
from .models.enresnet import EnResNet, NoiseSource, _check_std_mode, derive_seed
from .models.resnet import STAGE_STRIDES, STAGE_WIDTHS, STEM_WIDTH, blocks_per_stage

_MEMBER_KEY = re.compile(r"^members\.(\d+)\.(.+)$")


def _conv(in_ch: int, out_ch: int, k: int, stride: int, groups: int) -> nn.Conv2d:
    """G members' convs as one grouped conv (3x3 padded, 1x1 not), no bias, as in models.resnet."""
    return nn.Conv2d(groups * in_ch, groups * out_ch, kernel_size=(k, k), stride=stride, padding=k // 2,
                     bias=False, groups=groups)


class StackedNoise(nn.Module):
    """out + sigma * std(member's out) * N(0, I) per member group, each from the member's generator."""

    def __init__(self, sources: Sequence[NoiseSource | None], channels: int):
        super().__init__()
        self.sources = list(sources)
        self.channels = channels
        self._sigmas: dict[tuple, Tensor] = {}

    def forward(self, out: Tensor) -> Tensor:
        active = [s is not None and s.enabled and s.sigma != 0.0 for s in self.sources]
        if not any(active):
            return out
        b, _, h, w = out.shape
        groups = out.unflatten(1, (len(self.sources), self.channels)).float()  # a view in NCHW and NHWC
        modes = {s.std_mode for s, on in zip(self.sources, active) if on}
        if len(modes) != 1:
            raise ValueError(f"stacked members must share one noise_std mode, got {sorted(modes)}")
        dims = (0, 2, 3, 4) if modes == {"batch"} else (2, 3, 4)
        std = groups.std(dim=dims, keepdim=True)  # per member (and per example for "sample")
        sigma = self._sigma([s.sigma if on else 0.0 for s, on in zip(self.sources, active)], out.device)
        shape = (b, self.channels, h, w)
        z = torch.stack([torch.randn(shape, generator=s.generator(out.device), device=out.device, dtype=out.dtype)
                         if on else torch.zeros(shape, device=out.device, dtype=out.dtype)
                         for s, on in zip(self.sources, active)], dim=1)
        return out + ((sigma * std).to(out.dtype) * z).flatten(1, 2)

    def _sigma(self, values: list[float], device: torch.device) -> Tensor:
        """The members' sigmas as a (1, K, 1, 1, 1) tensor, kept: a host-to-device copy per call would be a sync,
        which a CUDA graph capture of the step cannot hold."""
        key = (tuple(values), device)
        if key not in self._sigmas:
            self._sigmas[key] = torch.tensor(values, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)
        return self._sigmas[key]


class StackedBlock(nn.Module):
    """G pre-activation blocks side by side (same layout as models.resnet.PreActBlock)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, noise: StackedNoise | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(groups * in_ch)
        self.conv1 = _conv(in_ch, out_ch, 3, stride, groups)
        self.bn2 = nn.BatchNorm2d(groups * out_ch)
        self.conv2 = _conv(out_ch, out_ch, 3, 1, groups)
        projection = stride != 1 or in_ch != out_ch
        self.shortcut = _conv(in_ch, out_ch, 1, stride, groups) if projection else None
        self.after_add = noise

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        out = self.conv2(F.relu(self.bn2(self.conv1(a)))) + shortcut
        return out if self.after_add is None else self.after_add(out)


class StackedEnResNet(nn.Module):
    """K EnResNets of one depth as one grouped network; see the module docstring for the interface."""

    def __init__(self, depth: int, member_counts: Sequence[int], sources: Sequence[Sequence[NoiseSource] | None],
                 num_classes: int = 10):
        super().__init__()
        n = blocks_per_stage(depth)
        if len(member_counts) < 1 or any(m < 1 for m in member_counts) or len(sources) != len(member_counts):
            raise ValueError(f"need one member count >= 1 and one noise-source list per model, got {member_counts}")
        self.depth, self.num_classes = depth, num_classes
        self.member_counts = [int(m) for m in member_counts]
        self.offsets = [sum(self.member_counts[:i]) for i in range(len(self.member_counts))]
        self.groups = g = sum(self.member_counts)
        # one NoiseSource per group (None: a plain resnet member without noise layers)
        self.sources: list[NoiseSource | None] = []
        for m, srcs in zip(self.member_counts, sources):
            self.sources += list(srcs) if srcs else [None] * m
        noisy = any(s is not None for s in self.sources)
        self.stem = _conv(3, STEM_WIDTH, 3, 1, g)
        in_ch = STEM_WIDTH
        stages = []
        for width, stride in zip(STAGE_WIDTHS, STAGE_STRIDES):
            blocks = []
            for b in range(n):
                noise = StackedNoise(self.sources, width) if noisy else None
                blocks.append(StackedBlock(in_ch, width, stride if b == 0 else 1, g, noise))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.head_bn = nn.BatchNorm2d(g * in_ch)
        self.width = in_ch
        bound = 1.0 / math.sqrt(in_ch)
        self.fc_weight = nn.Parameter(torch.empty(g, num_classes, in_ch).uniform_(-bound, bound))
        self.fc_bias = nn.Parameter(torch.empty(g, num_classes).uniform_(-bound, bound))
        self.archs: list[str] = []
        self.arch_configs: list[dict[str, Any]] = []
        self._member_index: dict[torch.device, Tensor] = {}

    @property
    def n_models(self) -> int:
        return len(self.member_counts)

    def pack(self, x: Tensor) -> Tensor:
        """(K*B, 3, H, W) -> (B, G*3, H, W): each member group gets its model's images."""
        k = self.n_models
        if x.dim() != 4 or x.shape[0] % k:
            raise ValueError(f"expected (K*B, C, H, W) with K = {k} models, got shape {tuple(x.shape)}")
        per_model = x.unflatten(0, (k, x.shape[0] // k))                             # (K, B, C, H, W)
        packed = per_model.index_select(0, self._model_of_member(x.device)).transpose(0, 1).flatten(1, 2)  # (B, G*C, H, W)
        if self.stem.weight.is_contiguous(memory_format=torch.channels_last):
            return packed.contiguous(memory_format=torch.channels_last)
        return packed.contiguous()

    def _model_of_member(self, device: torch.device) -> Tensor:
        """The model index of each member group, made once per device: built per call it would copy from the host
        and size a repeat from device values, two syncs a CUDA graph capture of the step cannot hold."""
        if device not in self._member_index:
            self._member_index[device] = torch.tensor(
                [i for i, m in enumerate(self.member_counts) for _ in range(m)], device=device, dtype=torch.long)
        return self._member_index[device]

    def forward(self, x: Tensor) -> Tensor:
        out = self.stage3(self.stage2(self.stage1(self.stem(self.pack(x)))))
        out = F.relu(self.head_bn(out)).mean(dim=(2, 3)).unflatten(1, (self.groups, self.width))  # (B, G, 64)
        logits = torch.einsum("bgc,gkc->bgk", out, self.fc_weight) + self.fc_bias                 # (B, G, classes)
        per_model = []
        for offset, m in zip(self.offsets, self.member_counts):  # sum in member order, then / m (as EnResNet)
            total = logits[:, offset]
            for j in range(1, m):
                total = total + logits[:, offset + j]
            per_model.append(total / m)
        return torch.cat(per_model, dim=0)

    # ----- the EnResNet noise API, applied to every model --------------------------------------------
    @property
    def has_noise(self) -> bool:
        return any(s is not None for s in self.sources)

    @property
    def noise_enabled(self) -> bool:
        return any(s is not None and s.enabled for s in self.sources)

    @property
    def noise_std(self) -> str | None:
        modes = [s.std_mode for s in self.sources if s is not None]
        return modes[0] if modes else None

    def set_noise(self, enabled: bool) -> "StackedEnResNet":
        for s in self.sources:
            if s is not None:
                s.enabled = bool(enabled)
        return self

    def set_noise_std(self, mode: str) -> "StackedEnResNet":
        _check_std_mode(mode)
        for s in self.sources:
            if s is not None:
                s.std_mode = mode
        return self

    def noise_generators(self) -> list[torch.Generator]:
        """The generators the noise layers made since the last reseed (a CUDA graph of the step registers them)."""
        return [s._generator for s in self.sources if s is not None and s._generator is not None]

    def seed_noise(self, seed: int | Sequence[int]) -> "StackedEnResNet":
        """Reseed model i's members exactly as ``EnResNet.seed_noise(seeds[i])`` would (one int: all models)."""
        seeds = [seed] * self.n_models if isinstance(seed, int) else list(seed)
        if len(seeds) != self.n_models:
            raise ValueError(f"seed_noise needs one seed or {self.n_models} seeds, got {len(seeds)}")
        for model_seed, offset, m in zip(seeds, self.offsets, self.member_counts):
            for j in range(m):
                source = self.sources[offset + j]
                if source is not None:
                    source.reseed(derive_seed(model_seed, "noise", j))
        return self


# --------------------------------------------------------------------------- state dicts
def split_member_key(key: str) -> tuple[int, str]:
    """'members.2.stem.weight' -> (2, 'stem.weight')."""
    m = _MEMBER_KEY.match(key)
    if m is None:
        raise KeyError(f"{key!r} is not an EnResNet member tensor (expected members.<i>.<name>)")
    return int(m[1]), m[2]


_STACKED_NAME = {"fc.weight": "fc_weight", "fc.bias": "fc_bias"}  # member name -> stacked name
_MEMBER_NAME = {v: k for k, v in _STACKED_NAME.items()}


def stacked_name(rest: str) -> str:
    """A member tensor's name in the stacked network (fc.weight -> fc_weight; others unchanged)."""
    return _STACKED_NAME.get(rest, rest)


def stack_state_dicts(state_dicts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """K EnResNet state dicts -> the StackedEnResNet state dict (members concatenated along dim 0)."""
    parts: dict[str, list[Tensor]] = {}
    for sd in state_dicts:
        for member, rest in sorted((split_member_key(k) for k in sd), key=lambda t: t[0]):
            parts.setdefault(rest, []).append(sd[f"members.{member}.{rest}"])
    out = {}
    for rest, tensors in parts.items():
        if rest.endswith("num_batches_tracked"):
            if any(not torch.equal(t, tensors[0]) for t in tensors):
                raise ValueError(f"cannot stack: members differ in {rest} ({[int(t) for t in tensors]} batches)")
            out[rest] = tensors[0].clone()
        elif rest.startswith("fc."):
            out[stacked_name(rest)] = torch.stack(tensors)
        else:
            out[rest] = torch.cat(tensors, dim=0)
    return out


def unstack_state_dict(state: dict[str, Tensor], member_counts: Sequence[int]) -> list[dict[str, Tensor]]:
    """The StackedEnResNet state dict -> K EnResNet state dicts (copies, keys ``members.<j>.<name>``)."""
    groups = sum(member_counts)
    models: list[dict[str, Tensor]] = [{} for _ in member_counts]
    for key, whole in state.items():
        rest = _MEMBER_NAME.get(key, key)
        if rest.endswith("num_batches_tracked"):
            chunks = [whole] * groups
        elif rest.startswith("fc."):
            chunks = list(whole.unbind(0))
        else:
            chunks = list(whole.chunk(groups, dim=0))
        g = 0
        for i, m in enumerate(member_counts):
            for j in range(m):
                models[i][f"members.{j}.{rest}"] = chunks[g].clone()
                g += 1
    return models


# --------------------------------------------------------------------------- models <-> stacked
def stack_models(models: Sequence[EnResNet]) -> StackedEnResNet:
    """One StackedEnResNet holding ``models``' weights and noise settings (their streams restart from the
    sources' seeds, as after ``copy.deepcopy``). Every model must have the same depth and classes."""
    if not models:
        raise ValueError("stack_models needs at least one model")
    depths = {m.members[0].depth for m in models}
    classes = {m.members[0].fc.out_features for m in models}
    if len(depths) != 1 or len(classes) != 1:
        raise ValueError(f"stacked models must share depth and classes, got depths {sorted(depths)}, "
                         f"classes {sorted(classes)}")
    sources = [[NoiseSource(s.seed, s.sigma, s.std_mode, s.enabled) for s in m._sources] for m in models]
    param = next(models[0].parameters())
    with torch.random.fork_rng(devices=[]):  # the placeholder init below must not move the global RNG
        stacked = StackedEnResNet(depths.pop(), [len(m.members) for m in models], sources, classes.pop())
    stacked.load_state_dict(stack_state_dicts([m.state_dict() for m in models]))
    stacked.archs = [getattr(m, "arch", "") for m in models]
    stacked.arch_configs = [dict(getattr(m, "arch_config", {})) for m in models]
    return stacked.to(device=param.device, dtype=param.dtype)


def unstack_models(stacked: StackedEnResNet) -> list[EnResNet]:
    """The K models (rebuilt with ``build(arch, **arch_config)``) holding the stacked weights and noise settings."""
    if len(stacked.archs) != stacked.n_models or not all(stacked.archs):
        raise ValueError("unstack_models needs a StackedEnResNet made by stack_models (architectures unknown)")
    param = stacked.fc_weight
    models = [build(arch, **cfg).to(device=param.device, dtype=param.dtype)
              for arch, cfg in zip(stacked.archs, stacked.arch_configs)]
    states = unstack_state_dict(stacked.state_dict(), stacked.member_counts)
    for i, model in enumerate(models):
        model.load_state_dict(states[i])
        for j, source in enumerate(model._sources):
            own = stacked.sources[stacked.offsets[i] + j]
            source.seed, source.sigma, source.std_mode, source.enabled = own.seed, own.sigma, own.std_mode, own.enabled
            source._generator = None
    return models


def build_stacked(names: Sequence[str], seeds: Sequence[int], **kwargs: Any) -> StackedEnResNet:
    """``stack_models([build(name, seed=seed, **kwargs) ...])``: the same initial weights and noise seeds as
    building each model alone."""
    if len(names) != len(seeds):
        raise ValueError(f"one seed per model: {len(names)} names, {len(seeds)} seeds")
    return stack_models([build(n, seed=s, **kwargs) for n, s in zip(names, seeds)])
