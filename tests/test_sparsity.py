"""Sparsity metrics, size report and packed export on crafted tensors with known answers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.func import functional_call

from paper_repro.quant import (
    BinaryRelax,
    NotRepresentable,
    dequantize,
    infer_codes,
    layer_table,
    load_packed,
    pack,
    project,
    save_packed,
    size_report,
    summary,
    unpack,
)
from paper_repro.quant.packing import HEADER_KEY, pack_bits, unpack_bits


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def crafted() -> dict[str, torch.Tensor]:
    g = torch.ones(4, 3, 2, 2)
    g[:, 1] = 0  # input channel 1 of 3: 16 zeros
    g[2] = 0  # filter 2 of 4: 8 more zeros
    g[0, 0, 0, 0] = 0  # one scattered zero -> 25 zeros of 48
    h = torch.full((2, 5, 3, 3), -0.5)
    h[:, 0] = 0
    h[:, 4] = 0  # 2 of 5 input channels, 36 zeros of 90
    fc = torch.arange(10.0).view(2, 5) % 2  # 5 zeros of 10
    return {
        "a.weight": g, "b.weight": h, "fc.weight": fc,
        "bn.running_mean": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(3),
    }


def test_layer_table_on_crafted_tensors() -> None:
    rows = layer_table(crafted(), ["a.weight", "b.weight", "fc.weight"])
    a, b, fc = rows
    assert a["name"] == "a.weight" and a["shape"] == [4, 3, 2, 2] and a["numel"] == 48 and a["nnz"] == 23
    assert a["weight_sparsity"] == pytest.approx(100 * 25 / 48)
    assert a["channel_sparsity"] == pytest.approx(100 / 3) and a["filter_sparsity"] == pytest.approx(25.0)
    assert a["levels"] == 2
    assert b["nnz"] == 54 and b["channel_sparsity"] == pytest.approx(40.0) and b["filter_sparsity"] == 0.0
    assert fc["weight_sparsity"] == 50.0 and fc["channel_sparsity"] == 0.0  # [[0,1,0,1,0],[1,0,1,0,1]]
    for key in ("name", "shape", "numel", "nnz", "weight_sparsity", "channel_sparsity", "filter_sparsity", "levels"):
        assert key in a


def test_summary_aggregates_like_the_authors() -> None:
    s = summary(crafted(), ["a.weight", "b.weight"])
    assert s["weight"] == pytest.approx(100 * (25 + 36) / (48 + 90))
    assert s["channel"] == pytest.approx(100 * (1 + 2) / (3 + 5))  # zero (layer, in-channel) pairs
    assert s["filter"] == pytest.approx(100 * 1 / (4 + 2))
    assert s["model_weight"] == pytest.approx(100 * (25 + 36 + 5) / (48 + 90 + 10))  # BN stats excluded
    assert s["counts"]["zero_channels"] == 3 and s["counts"]["channels"] == 8
    assert [r["name"] for r in s["layers"]] == ["a.weight", "b.weight"]


def test_channel_sparsity_ignores_non_conv_quantized_tensors() -> None:
    s = summary(crafted(), ["a.weight", "fc.weight"])
    assert s["channel"] == pytest.approx(100 / 3) and s["counts"]["channels"] == 3


def test_l2_tolerance_rule() -> None:
    g = torch.ones(2, 3, 3, 3)
    g[:, 2] = 1e-20
    assert summary({"g": g}, ["g"])["channel"] == 0.0
    assert summary({"g": g}, ["g"], l2_tol=1e-15)["channel"] == pytest.approx(100 / 3)


def test_vector_rows_have_no_channels() -> None:
    row = layer_table({"v": torch.tensor([0.0, 1.0, 0.0])}, ["v"])[0]
    assert row["weight_sparsity"] == pytest.approx(200 / 3) and row["channel_sparsity"] is None


def model_tensors(scheme: str, seed: int = 0, **opts) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(16, 16, 3, 3, generator=g)
    return {
        "conv.weight": project(conv, scheme, **opts), "fc.weight": torch.randn(10, 16, generator=g),
        "fc.bias": torch.zeros(10), "bn.weight": torch.ones(16), "bn.bias": torch.zeros(16),
        "bn.running_mean": torch.zeros(16), "bn.running_var": torch.ones(16),
        "bn.num_batches_tracked": torch.tensor(0),
    }


@pytest.mark.parametrize("scheme,bits,code_bytes", [("binary", 1, 288), ("ternary", 2, 576), ("4bit", 4, 1152)])
def test_size_report_known_bytes(scheme: str, bits: int, code_bytes: int) -> None:
    rep = size_report(model_tensors(scheme), ["conv.weight"], scheme)
    floats = 160 + 10 + 16 + 16
    assert rep["bits_per_quantized_weight"] == bits
    assert rep["code_bytes"] == code_bytes and rep["scale_bytes"] == 4
    assert rep["packed_bytes"] == code_bytes + 4 + 4 * floats
    assert rep["fp32_bytes"] == 4 * (2304 + floats)
    assert rep["compression"] == pytest.approx(4 * (2304 + floats) / (code_bytes + 4 + 4 * floats))
    assert rep["buffer_bytes"] == 4 * 32 and rep["fallbacks"] == []


def test_size_of_full_precision_model() -> None:
    rep = size_report(model_tensors("binary"), [], None)
    assert rep["compression"] == 1.0 and rep["quantized_weights"] == 0


def test_size_counts_actual_values_not_declared_width() -> None:
    w = dequantize(torch.tensor([2, 4, -6, 0] * 9, dtype=torch.int8), torch.tensor(0.37))
    rep = size_report({"w": w}, ["w"], "4bit")
    assert rep["layers"][0]["bits"] == 3  # codes are 0, +-1, +-2, +-3 of scale 0.74


def test_binary_with_exact_zeros_falls_back_to_2_bits() -> None:
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    w[0, 0] = 0
    q = project(w, "binary")
    rep = size_report({"w": q}, ["w"], "binary")
    assert rep["layers"][0]["bits"] == 2 and rep["code_bytes"] == 288 * 2 // 8
    assert rep["fallbacks"] and "exact zeros" in rep["fallbacks"][0]["reason"]
    arrays, header = pack({"w": q}, ["w"], "binary")
    assert bitwise(unpack(arrays, header)["w"], q)


def test_not_representable_tensors_are_refused() -> None:
    w = torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    with pytest.raises(NotRepresentable):
        pack({"w": w}, ["w"], "ternary")  # float weights
    with pytest.raises(NotRepresentable):
        pack({"w": project(w, "4bit")}, ["w"], "ternary")  # too many levels for the scheme
    with pytest.raises(NotRepresentable):
        infer_codes(torch.tensor([-0.0, 1.0]))  # a negative zero would not come back bit-identical


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (37 * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, 37), codes.to(torch.int32))


def test_bit_order_is_little_endian() -> None:
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [129]
    assert pack_bits(torch.tensor([3, 0, 1]), 2).tolist() == [0b010011]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.Conv2d(8, 8, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


SCHEMES = [("binary", {}), ("ternary", {}), ("ternary", {"scale": "twn"}), ("4bit", {}), ("kbit", {"bits": 3}),
           ("kbit", {"bits": 8}), (None, {})]


@pytest.mark.parametrize("scheme,opts", SCHEMES)
def test_packed_file_round_trip_is_bit_identical(tmp_path, scheme, opts) -> None:
    net = tiny_net()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.1, 0.1)
    br = BinaryRelax(net, scheme, **opts)
    deployed = br.deployed_tensors()
    path = tmp_path / "sub" / "model.packed.safetensors"
    header = save_packed(path, deployed, br.names, scheme, meta={"run": "t"}, **opts)
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind
    loaded, header2 = load_packed(path)
    assert list(loaded) == list(deployed)
    assert all(bitwise(loaded[k], deployed[k]) for k in deployed)
    assert header2["meta"] == {"run": "t"} and header["file_bytes"] == path.stat().st_size
    kinds = {k: e["kind"] for k, e in header2["tensors"].items()}
    assert [k for k, v in kinds.items() if v == "quantized"] == br.names
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    net.eval()
    with br.deployed():
        ref = net(x)
    assert torch.equal(functional_call(net, loaded, (x,)), ref)
    with safe_open(str(path), framework="pt") as f:
        json.loads(f.metadata()[HEADER_KEY])
        if br.names:
            assert f.get_tensor(f"{br.names[0]}::codes").dtype == torch.uint8


def test_failed_save_leaves_nothing(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    with pytest.raises(NotRepresentable):
        save_packed(path, {"w": torch.randn(3, 3)}, ["w"], "binary")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pack_on_gpu_matches_cpu() -> None:
    q = project(torch.randn(32, 16, 3, 3).cuda(), "4bit")
    arrays, header = pack({"w": q}, ["w"], "4bit")
    assert bitwise(unpack(arrays, header)["w"].cpu(), q.cpu())


def test_resnet20_compression_if_models_available() -> None:
    models = pytest.importorskip("paper_repro.models")
    if not hasattr(models, "build"):
        pytest.skip("paper_repro.models.build not written yet")
    net = models.build("resnet20")
    expected = {"ternary": 12.76, "binary": 20.99}  # paper-spec section 3: "about 12.8x" and "about 21x"
    for scheme, ratio in expected.items():
        br = BinaryRelax(net, scheme)
        rep = size_report(br.deployed_tensors(), br.names, scheme)
        assert rep["quantized_weights"] + rep["float_weights"] == 272_282
        assert rep["compression"] == pytest.approx(ratio, abs=0.01)
