"""Models: architecture and parameter counts, ensembles, noise behaviour and seeding, names."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from paper_repro.models import build, names
from paper_repro.models.enresnet import parse_arch, parse_name


pytestmark = pytest.mark.usefixtures("single_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_params(depth: int, num_classes: int = 10) -> int:
    """Count from the spec's layout, written out independently of the model code."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9  # stem
    in_ch = 16
    for width in (16, 32, 64):
        for b in range(n):
            total += in_ch * width * 9 + width * width * 9  # two 3x3 convs
            total += 2 * in_ch + 2 * width  # bn1 (on the input) and bn2
            if in_ch != width:
                total += in_ch * width  # 1x1 projection shortcut, no BN
            in_ch = width
    return total + 2 * 64 + 64 * num_classes + num_classes  # head BN + fc


def x_batch(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_resnet20_has_272282_parameters_split_as_in_the_spec():
    model = build("resnet20")
    assert n_params(model) == 272_282
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.weight.numel() for m in convs) == 270_256
    assert sum(m.weight.numel() for m in convs if m.kernel_size == (1, 1)) == 2_560
    assert sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()) == 650
    assert sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()) == 1_376
    assert all(m.kernel_size in {(3, 3), (1, 1)} and m.bias is None for m in convs)
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19  # stem + 18 block convs


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110])
def test_parameter_count_follows_the_formula(depth):
    assert n_params(build(f"resnet{depth}")) == expected_params(depth)
    assert n_params(build(f"resnet{depth}", num_classes=100)) == expected_params(depth, 100)


def test_ensemble_members_and_parameter_names():
    model = build("en2resnet20")
    assert len(model.members) == 2
    assert n_params(model) == 2 * 272_282
    names_ = [n for n, _ in model.named_parameters()]
    assert names_[0] == "members.0.stem.weight"
    for expected in ("members.1.stage2.0.shortcut.weight", "members.0.stage3.2.conv2.weight",
                     "members.1.head_bn.bias", "members.1.fc.weight"):
        assert expected in names_
    out = model(x_batch(3))
    assert out.shape == (3, 10)
    assert build("resnet20", num_classes=100)(x_batch(2)).shape == (2, 100)


def test_works_on_16x16_inputs_and_members_have_distinct_weights():
    model = build("en2resnet20")
    assert model(x_batch(2, size=16)).shape == (2, 10)
    a, b = model.members
    assert not torch.equal(a.stem.weight, b.stem.weight)


def test_init_follows_the_reference():
    model = build("resnet110")
    conv = model.members[0].stage3[5].conv1  # 64 out channels: std = sqrt(2 / (9 * 64))
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 64)) ** 0.5, rel=0.02)
    bn = model.members[0].stage2[0].bn2
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_ensemble_output_is_the_mean_of_member_logits():
    model = build("en5resnet20", noise=False).eval()
    x = x_batch(3)
    with torch.no_grad():
        mean = torch.stack([m(x) for m in model.members]).mean(dim=0)
        assert torch.allclose(model(x), mean, atol=1e-6)


def test_noise_present_in_eval_and_training_and_absent_when_off():
    model = build("en1resnet20", seed=3).eval()
    x = x_batch()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.set_noise(False)
        assert not model.noise_enabled and model.has_noise
        assert torch.equal(model(x), model(x))
        off = build("en1resnet20", noise=False, seed=3).eval()
        assert torch.equal(off(x), model(x))
        training = build("en1resnet20", seed=3).train()
        assert not torch.equal(training(x), training(x))
    plain = build("resnet20").eval()
    assert not plain.has_noise
    plain.set_noise(True)  # no noise layers: stays deterministic
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


def test_noise_magnitude_is_sigma_times_batch_std():
    model = build("en1resnet20", noise=False).eval()
    block = model.members[0].stage1[0]
    captured = {}
    block.after_add.register_forward_hook(lambda mod, inp, out: captured.update(inp=inp[0], out=out))
    model.set_noise(True)
    with torch.no_grad():
        model(x_batch(8))
    clean, noisy = captured["inp"], captured["out"]
    ratio = ((noisy - clean).std() / clean.std()).item()
    assert ratio == pytest.approx(0.1, rel=0.05)


def test_noise_gradient_flows_through_std():
    model = build("en1resnet20").eval()
    x = x_batch(2).requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_per_sample_std_option():
    model = build("en1resnet20", noise_std="sample").eval()
    assert model.noise_std == "sample" and model.arch_config["noise_std"] == "sample"
    with torch.no_grad():
        assert not torch.equal(model(x_batch()), model(x_batch()))
    with pytest.raises(ValueError):
        build("en1resnet20", noise_std="channel")


def test_seeded_noise_repeats_exactly_and_differs_across_seeds():
    x = x_batch()

    def two_passes(seed: int) -> torch.Tensor:
        model = build("en2resnet20", seed=0).eval()
        model.seed_noise(seed)
        with torch.no_grad():
            return torch.cat([model(x), model(x)])

    assert torch.equal(two_passes(7), two_passes(7))
    assert not torch.equal(two_passes(7), two_passes(8))
    # build(seed=...) seeds both the weights and the noise
    a, b = build("en1resnet20", seed=5).eval(), build("en1resnet20", seed=5).eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), build("en1resnet20", seed=6).eval()(x))


def test_members_draw_different_noise_streams():
    model = build("en2resnet20", noise=False).eval()
    model.members[1].load_state_dict(model.members[0].state_dict())
    x = x_batch()
    with torch.no_grad():
        assert torch.equal(model.members[0](x), model.members[1](x))
        model.set_noise(True)
        assert not torch.equal(model.members[0](x), model.members[1](x))


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build("en2resnet20")
    assert torch.equal(torch.rand(3), expected)


def test_deepcopy_keeps_noise_sources_shared_within_a_member():
    model = build("en1resnet20")
    clone = copy.deepcopy(model)
    blocks = [b for s in ("stage1", "stage2", "stage3") for b in getattr(clone.members[0], s)]
    assert len({id(b.after_add.source) for b in blocks}) == 1
    clone.set_noise(False)
    assert model.noise_enabled and not clone.noise_enabled


def test_arch_and_config_rebuild_the_same_architecture():
    model = build("en2resnet56", num_classes=100, noise=False, sigma=0.2, seed=4)
    assert model.arch == "en2resnet56"
    assert json.loads(json.dumps(model.arch_config)) == model.arch_config
    again = build(model.arch, **model.arch_config)
    assert [(n, p.shape) for n, p in again.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert not again.noise_enabled
    assert build("resnet20").arch_config["noise"] is False


def test_names_parse_generally():
    assert parse_name("resnet20") == (1, 20, False)
    assert parse_name("en5resnet20") == (5, 20, True)
    assert parse_name("en1resnet110") == (1, 110, True)
    assert parse_name("en3resnet14") == (3, 14, True)
    for name in names():
        parse_arch(name)  # parse_name: the ResNet family only
    assert parse_arch("en5wrn34-10").family == "wrn" and parse_arch("vgg11").family == "vgg"
    assert {"resnet20", "en1resnet20", "en2resnet20", "en5resnet20", "en1resnet56", "en2resnet56",
            "en1resnet110"} <= set(names())


@pytest.mark.parametrize("bad", ["resnet21", "resnet2", "en0resnet20", "en2resnet", "vgg12", "EnResNet20",
                                 "en2resnet20x", "resnet-20", ""])
def test_invalid_names_raise_with_the_valid_patterns(bad):
    with pytest.raises(ValueError, match="valid patterns"):
        build(bad)


def test_invalid_settings_raise():
    with pytest.raises(ValueError):
        build("resnet20", num_classes=1)
    with pytest.raises(ValueError):
        build("en1resnet20", sigma=-0.1)
    with pytest.raises(ValueError):
        build("en1resnet20", seed=-1)


def test_channels_last_and_generator_on_input_device():
    model = build("en1resnet20").eval().to(memory_format=torch.channels_last)
    x = x_batch().to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert model._sources[0].generator(torch.device("cpu")).device.type == "cpu"


def test_bf16_autocast_forward():
    model = build("en1resnet20").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x_batch())
    assert torch.isfinite(out.float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_follows_the_model():
    model = build("en1resnet20", seed=2).cuda().eval()
    x = x_batch().cuda().to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.seed_noise(1)
        a = model(x)
        model.seed_noise(1)
        b = model(x)
    assert torch.equal(a, b)
    assert model._sources[0]._generator.device.type == "cuda"
