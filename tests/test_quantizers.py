"""Quantizers against hand-worked examples and the properties their formulas imply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from paper_repro.quant import (
    check_scheme,
    levels,
    nominal_bits,
    project,
    quantize_codes,
    select_quantized,
    selection_report,
)

ALL = [("binary", {}), ("ternary", {}), ("ternary", {"scale": "twn"}), ("4bit", {}),
       ("kbit", {"bits": 2}), ("kbit", {"bits": 3}), ("kbit", {"bits": 5}), ("kbit", {"bits": 8})]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_binary_hand_example() -> None:
    w = torch.tensor([1.0, -2.0, 3.0, -4.0])
    assert torch.equal(project(w, "binary"), torch.tensor([2.5, -2.5, 2.5, -2.5]))


def test_binary_keeps_exact_zeros() -> None:
    w = torch.tensor([0.0, 2.0, -4.0])  # a = mean|W| = 2 over ALL entries; sign(0) = 0
    q = project(w, "binary")
    assert torch.equal(q, torch.tensor([0.0, 2.0, -2.0]))
    assert not torch.signbit(q[0])  # a plain zero, never -0.0


def test_binary_scale_is_least_squares_on_fine_grid() -> None:
    w = rand(64, 9)
    a = project(w, "binary").abs().max().item()
    grid = torch.linspace(0.5 * a, 1.5 * a, 20001, dtype=torch.float64)
    err = ((w.double().unsqueeze(0) - grid.view(-1, 1, 1) * torch.sign(w.double())) ** 2).sum(dim=(1, 2))
    best = grid[err.argmin()].item()
    assert abs(best - a) <= (grid[1] - grid[0]).item()


def test_ternary_hand_example_both_scales() -> None:
    # mean|W| = 1 -> D = 0.7 -> kept: 0.75, 1.5, 2.0, 1.0 (sum 5.25) out of n = 6
    w = torch.tensor([0.2, -0.55, 0.75, -1.5, 2.0, -1.0])
    mask = torch.tensor([0.0, 0.0, 1.0, -1.0, 1.0, -1.0])
    assert torch.allclose(project(w, "ternary"), 5.25 / 6 * mask)
    assert torch.allclose(project(w, "ternary", scale="ref"), 5.25 / 6 * mask)
    assert torch.allclose(project(w, "ternary", scale="twn"), 5.25 / 4 * mask)
    assert torch.equal(project(w, "ternary") == 0, mask == 0)


def test_ternary_zeros_exactly_below_threshold() -> None:
    w = rand(32, 16, 3, 3, seed=1)
    delta = 0.7 * w.abs().mean()
    for scale in ("ref", "twn"):
        q = project(w, "ternary", scale=scale)
        assert torch.equal(q == 0, w.abs() < delta)


def test_4bit_hand_example() -> None:
    w = torch.tensor([15.0, 1.0, 1.5, 3.0, 3.5, 13.0, 13.5, -2.0, 0.0, -5.5])  # d = 15/15 = 1
    codes, scale = quantize_codes(w, "4bit")
    expected = [7, 0, 1, 1, 2, 6, 7, -1, 0, -3]
    assert codes.tolist() == expected
    q = np.array(expected, dtype=np.float64)
    s = float(np.sum(np.abs(w.numpy()) * np.abs(q)) / np.sum(q * q))
    assert scale.item() == pytest.approx(s, rel=1e-6)
    assert torch.allclose(project(w, "4bit"), torch.tensor(s * q, dtype=torch.float32))
    assert torch.equal(project(w, "4bit") == 0, torch.tensor([False, True] + [False] * 6 + [True, False]))


def test_4bit_zeros_exactly_at_or_below_max_over_15() -> None:
    w = rand(32, 16, 3, 3, seed=2)
    q = project(w, "4bit")
    assert torch.equal(q == 0, w.abs() <= w.abs().max() / 15)


def test_4bit_scale_is_least_squares_for_fixed_codes() -> None:
    w = rand(16, 8, 3, 3, seed=3)
    codes, scale = quantize_codes(w, "4bit")
    grid = torch.linspace(0.9, 1.1, 4001, dtype=torch.float64) * scale.item()
    err = ((w.double().unsqueeze(0) - grid.view(-1, 1, 1, 1, 1) * codes.double()) ** 2).flatten(1).sum(1)
    assert abs(grid[err.argmin()].item() - scale.item()) <= (grid[1] - grid[0]).item()


def test_4bit_equals_kbit_4() -> None:
    w = rand(16, 8, 3, 3, seed=4)
    assert torch.equal(project(w, "4bit"), project(w, "kbit", bits=4))


IDEMPOTENT = [("binary", {}), ("ternary", {"scale": "twn"}), ("4bit", {}), ("kbit", {"bits": 6})]


@pytest.mark.parametrize("scheme,opts", IDEMPOTENT)
def test_idempotent_schemes(scheme: str, opts: dict) -> None:
    w = rand(32, 16, 3, 3, seed=5)  # no exact zeros, so binary is idempotent too
    q1 = project(w, scheme, **opts)
    q2 = project(q1, scheme, **opts)
    c1, _ = quantize_codes(q1, scheme, **opts)
    c0, _ = quantize_codes(w, scheme, **opts)
    assert torch.equal(c0, c1)  # same codes, same zeros
    assert torch.allclose(q1, q2, rtol=1e-6, atol=0)


def test_reference_ternary_scale_shrinks_when_reapplied() -> None:
    w = rand(32, 16, 3, 3, seed=6)
    q1 = project(w, "ternary")
    q2 = project(q1, "ternary")
    kept = (q1 != 0).float().mean().item()  # sum(M)/n
    assert torch.equal(q1 == 0, q2 == 0)
    assert q2.abs().max().item() == pytest.approx(kept * q1.abs().max().item(), rel=1e-6)
    assert q2.abs().max() < q1.abs().max()


@pytest.mark.parametrize("scheme,opts", ALL)
def test_at_most_levels_values(scheme: str, opts: dict) -> None:
    for seed in range(3):
        w = rand(64, 32, 3, 3, seed=seed) * (seed + 0.1)
        q = project(w, scheme, **opts)
        n_levels = levels(scheme, **opts)
        assert torch.unique(q).numel() <= n_levels
        codes, _ = quantize_codes(w, scheme, **opts)
        assert codes.abs().max().item() == (n_levels - 1) // 2 or scheme == "binary"


def test_levels_and_bits_table() -> None:
    assert [levels(s, **o) for s, o in ALL[:4]] == [2, 3, 3, 15]
    assert levels("kbit", bits=3) == 7 and levels("kbit", bits=8) == 255
    assert [nominal_bits(s) for s in ("binary", "ternary", "4bit")] == [1, 2, 4]
    assert levels(None) is None and nominal_bits("none") is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scheme,opts", ALL[:4])
def test_computes_in_fp32_and_returns_input_dtype(dtype: torch.dtype, scheme: str, opts: dict) -> None:
    w = rand(8, 4, 3, 3, seed=7).to(dtype)
    q = project(w, scheme, **opts)
    assert q.dtype == dtype
    assert torch.equal(q, project(w.float(), scheme, **opts).to(dtype))


@pytest.mark.parametrize("scheme,opts", ALL)
def test_never_in_place(scheme: str, opts: dict) -> None:
    w = rand(8, 4, 3, 3, seed=8).requires_grad_()
    before = w.detach().clone()
    q = project(w, scheme, **opts)
    assert torch.equal(w.detach(), before)
    assert q.data_ptr() != w.data_ptr() and not q.requires_grad


def test_none_scheme_is_a_copy() -> None:
    w = rand(4, 4)
    for scheme in (None, "none"):
        q = project(w, scheme)
        assert torch.equal(q, w) and q.data_ptr() != w.data_ptr()


def test_all_zero_tensor() -> None:
    w = torch.zeros(4, 2, 3, 3)
    for scheme, opts in ALL:
        assert torch.equal(project(w, scheme, **opts), w)


def test_bad_schemes_and_options() -> None:
    with pytest.raises(ValueError):
        project(rand(3), "3bit")
    with pytest.raises(ValueError):
        project(rand(3), "ternary", scale="mean")
    with pytest.raises(ValueError):
        project(rand(3), "binary", bits=1)
    for bits in (None, 1, 9, 2.0):
        with pytest.raises(ValueError):
            check_scheme("kbit", bits=bits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("scheme,opts", ALL)
def test_gpu_matches_cpu_codes(scheme: str, opts: dict) -> None:
    w = rand(64, 32, 3, 3, seed=9)
    c_cpu, s_cpu = quantize_codes(w, scheme, **opts)
    c_gpu, s_gpu = quantize_codes(w.cuda(), scheme, **opts)
    assert c_gpu.is_cuda and torch.equal(c_cpu, c_gpu.cpu())
    assert s_gpu.item() == pytest.approx(s_cpu.item(), rel=1e-5)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(8, 8, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn(x))
        return self.conv(a) + self.shortcut(a)


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_select_reference_rule() -> None:
    net = tiny_net()
    assert select_quantized(net) == ["0.weight", "1.conv.weight"]  # stem bias, 1x1, BN, fc stay float


def test_select_custom_rule_and_report() -> None:
    net = tiny_net()
    names = select_quantized(net, lambda name, module, p: isinstance(module, nn.Conv2d) and name.endswith("weight"))
    assert names == ["0.weight", "1.conv.weight", "1.shortcut.weight"]
    rep = selection_report(net, ["0.weight", "1.conv.weight"])
    assert [r["name"] for r in rep["quantized"]] == ["0.weight", "1.conv.weight"]
    assert rep["n_quantized_weights"] == 3 * 8 * 9 + 8 * 8 * 9
    assert "1.shortcut.weight" in [r["name"] for r in rep["float"]] and "4.weight" in [r["name"] for r in rep["float"]]
    assert rep["n_quantized_weights"] + rep["n_float_weights"] == sum(p.numel() for p in net.parameters())
    with pytest.raises(KeyError):
        selection_report(net, ["nope.weight"])


def test_select_resnet20_if_models_available() -> None:
    models = pytest.importorskip("paper_repro.models")
    if not hasattr(models, "build"):
        pytest.skip("paper_repro.models.build not written yet")
    net = models.build("resnet20")
    names = select_quantized(net)
    assert len(names) == 19
    params = dict(net.named_parameters())
    assert all(params[n].ndim == 4 and params[n].shape[-2:] == (3, 3) for n in names)
    rest = [n for n, p in params.items() if n not in names]
    assert sum(1 for n in rest if params[n].ndim == 4) == 2  # the two 1x1 shortcuts
    assert sum(params[n].numel() for n in names) == 270_256 - 2_560
