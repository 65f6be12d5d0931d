"""BinaryRelax / BinaryConnect weight swapping, schedule, gradients and resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from paper_repro.quant import BinaryRelax, project, select_quantized, size_report, summary


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def batch(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def test_selects_3x3_convs_by_default() -> None:
    br = BinaryRelax(tiny_net(), "ternary")
    assert br.names == ["0.weight", "3.weight"]
    assert BinaryRelax(tiny_net(), "ternary", names=["3.weight"]).names == ["3.weight"]
    with pytest.raises(KeyError):
        BinaryRelax(tiny_net(), "ternary", names=["99.weight"])


def test_u_moves_from_w_toward_q_as_eta_grows() -> None:
    net = tiny_net()
    br = BinaryRelax(net, "binary", hard_epoch=100)
    w = net[3].weight.detach().clone()
    q = project(w, "binary")
    assert torch.allclose(br.relaxed_weight(w), (q + w) / 2)  # eta0 = 1
    dists, etas = [], []
    for epoch in range(60):
        u = br.relaxed_weight(w)
        dists.append((u - q).norm().item())
        etas.append(br.eta)
        br.end_epoch(epoch)
    assert all(b < a for a, b in zip(dists, dists[1:]))
    full = (w - q).norm().item()  # U - Q = (W - Q) / (1 + eta)
    assert all(d == pytest.approx(full / (1 + eta), rel=1e-4) for d, eta in zip(dists, etas))


def test_eta_schedule_and_phase_switch() -> None:
    br = BinaryRelax(tiny_net(), "ternary", rho=1.5, hard_epoch=3)
    etas, phases = [], []
    for epoch in range(6):
        etas.append(br.eta)
        phases.append(br.phase())
        assert br.phase(epoch) == phases[-1]
        assert br.selectable(epoch) == (epoch >= 3)
        br.end_epoch(epoch)
    assert phases == [1, 1, 1, 2, 2, 2]
    assert etas[:3] == [1.0, 1.5, 2.25]  # epoch e of phase 1 uses eta0 * rho^e
    with pytest.raises(ValueError):
        br.end_epoch(2)  # out of order


def test_paper_schedule_reaches_about_332() -> None:
    br = BinaryRelax(tiny_net(), "ternary")
    for epoch in range(200):
        br.end_epoch(epoch)
    assert br.eta == pytest.approx(1.05**119) and round(br.eta) == 332


def test_phase2_and_bc_use_q_of_w() -> None:
    net = tiny_net()
    w = net[3].weight.detach().clone()
    for br in (BinaryRelax(net, "4bit", method="BC"), BinaryRelax(net, "4bit", hard_epoch=0)):
        assert br.phase(0) == 2 and br.selectable(0)
        with br.relaxed():
            assert torch.equal(net[3].weight, project(w, "4bit"))
        assert torch.equal(net[3].weight, w)


def test_relaxed_swaps_only_selected_and_restores_bitwise() -> None:
    net = tiny_net()
    br = BinaryRelax(net, "ternary")
    before = snapshot(net)
    with br.relaxed():
        after_in = snapshot(net)
        assert torch.allclose(after_in["3.weight"], br.relaxed_weight(before["3.weight"]))
        assert torch.equal(after_in["6.weight"], before["6.weight"])  # 1x1 stays float
        assert torch.equal(after_in["9.weight"], before["9.weight"])  # fc stays float
    assert bit_equal(snapshot(net), before)


def test_restores_on_exception() -> None:
    net = tiny_net()
    br = BinaryRelax(net, "binary")
    before = params(net)
    with pytest.raises(RuntimeError, match="boom"):
        with br.relaxed():
            net(batch()[0]).sum().backward()  # (updates BN running stats, which are not swapped)
            raise RuntimeError("boom")
    assert bit_equal(params(net), before)
    with br.deployed():  # usable again afterwards
        pass


def test_contexts_do_not_nest() -> None:
    br = BinaryRelax(tiny_net(), "binary")
    with br.relaxed():
        with pytest.raises(RuntimeError):
            with br.deployed():
                pass
        with pytest.raises(RuntimeError):
            br.deployed_tensors()


def test_grad_applied_to_w_is_dl_du() -> None:
    net = tiny_net()
    br = BinaryRelax(net, "ternary", eta0=2.0)
    x, y = batch()
    w = {k: v.detach().clone() for k, v in net.named_parameters()}
    u = {k: (br.relaxed_weight(v) if k in br.names else v.clone()).requires_grad_() for k, v in w.items()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    loss = F.cross_entropy(functional_call(net, {**u, **buffers}, (x,)), y)
    manual = dict(zip(u, torch.autograd.grad(loss, list(u.values()))))

    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.zero_grad()
    with br.relaxed():
        F.cross_entropy(net(x), y).backward()
    for name, p in net.named_parameters():
        assert torch.allclose(p.grad, manual[name], atol=1e-6), name
        assert torch.equal(p.detach(), w[name])  # W back in place before the step
    opt.step()
    for name, p in net.named_parameters():  # first SGD step: W - lr (g + wd W), on the float W
        assert torch.allclose(p.detach(), w[name] - 0.1 * (manual[name] + 5e-4 * w[name]), atol=1e-6), name


def test_step_changes_float_w_and_deployed_is_q_of_w() -> None:
    net = tiny_net()
    br = BinaryRelax(net, "4bit")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    w0 = net[3].weight.detach().clone()
    x, y = batch()
    with br.relaxed():
        F.cross_entropy(net(x), y).backward()
    opt.step()
    w1 = net[3].weight.detach().clone()
    assert not torch.equal(w0, w1)
    assert torch.unique(w1).numel() > 15  # the optimizer holds float weights
    deployed = br.deployed_tensors()
    assert set(deployed) == set(net.state_dict())
    for name in br.names:
        assert torch.equal(deployed[name], project(net.state_dict()[name], "4bit"))
    assert torch.equal(deployed["9.weight"], net[9].weight)
    with br.deployed():
        assert torch.equal(net[3].weight, deployed["3.weight"])
        inside = net.eval()(x)
    net.train()
    assert torch.equal(net[3].weight, w1)
    ref = functional_call(net.eval(), deployed, (x,))
    assert torch.equal(inside, ref)


def test_attack_style_passes_inside_relaxed() -> None:
    net = tiny_net()
    br = BinaryRelax(net, "ternary")
    x, y = batch()
    before = snapshot(net)
    with br.relaxed():
        x_adv = x.clone()
        for _ in range(3):  # PGD-like: gradients w.r.t. inputs only
            x_adv.requires_grad_()
            g, = torch.autograd.grad(F.cross_entropy(net(x_adv), y), x_adv)
            x_adv = (x_adv.detach() + 0.01 * g.sign()).clamp(0, 1)
        assert all(p.grad is None for p in net.parameters())
        F.cross_entropy(net(x_adv), y).backward()
        F.cross_entropy(net(x), y).backward()  # e.g. a trade-off loss's second term
    assert all(p.grad is not None for p in net.parameters())
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in dict(net.named_parameters()))


def test_backward_after_exit_is_refused() -> None:
    net = tiny_net()
    br = BinaryRelax(net, "binary")
    x, y = batch()
    with br.relaxed():
        loss = F.cross_entropy(net(x), y)
    with pytest.raises(RuntimeError):
        loss.backward()  # saved U was overwritten by W: autograd's version check catches it


def test_follows_model_dtype_change() -> None:
    net = tiny_net()
    br = BinaryRelax(net, "ternary")
    with br.relaxed():
        pass
    net.double()
    x, y = batch()
    with br.relaxed():
        F.cross_entropy(net(x.double()), y).backward()
    assert net[3].weight.dtype == torch.float64


def test_none_is_a_no_op() -> None:
    net = tiny_net()
    br = BinaryRelax(net, None, method="BR")
    assert br.method == "none" and br.names == [] and not br.quantized
    before = snapshot(net)
    with br.relaxed():
        assert bit_equal(snapshot(net), before)
    with br.deployed():
        pass
    assert bit_equal(br.deployed_tensors(), before)
    for epoch in range(3):
        assert br.phase(epoch) == 2 and br.selectable(epoch)
        br.end_epoch(epoch)
    assert br.eta == 1.0
    assert BinaryRelax(net, "none").method == "none"
    with pytest.raises(ValueError):
        BinaryRelax(net, "binary", method="none")


def train_epochs(net: nn.Module, br: BinaryRelax, opt: torch.optim.Optimizer, epochs: range, steps: int) -> None:
    for epoch in epochs:
        for step in range(steps):
            x, y = batch(seed=1000 * epoch + step)
            opt.zero_grad(set_to_none=True)
            with br.relaxed():
                F.cross_entropy(net(x), y).backward()
            opt.step()
        br.end_epoch(epoch)


def test_resume_is_bit_identical() -> None:
    def fresh() -> tuple[nn.Module, BinaryRelax, torch.optim.Optimizer]:
        net = tiny_net(seed=3)
        return net, BinaryRelax(net, "ternary", rho=1.3, hard_epoch=3), torch.optim.SGD(
            net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    net_a, br_a, opt_a = fresh()
    train_epochs(net_a, br_a, opt_a, range(5), steps=3)

    net_b, br_b, opt_b = fresh()
    train_epochs(net_b, br_b, opt_b, range(2), steps=3)
    saved = (snapshot(net_b), json.loads(json.dumps(br_b.state_dict())), opt_b.state_dict())
    net_c, br_c, opt_c = fresh()
    net_c.load_state_dict(saved[0])
    br_c.load_state_dict(saved[1])
    opt_c.load_state_dict(saved[2])
    assert br_c.eta == br_b.eta and br_c.epoch == 2
    train_epochs(net_c, br_c, opt_c, range(2, 5), steps=3)
    assert br_c.state_dict() == br_a.state_dict()
    assert bit_equal(snapshot(net_c), snapshot(net_a))
    assert bit_equal(br_c.deployed_tensors(), br_a.deployed_tensors())


def test_load_state_dict_refuses_other_config() -> None:
    state = BinaryRelax(tiny_net(), "ternary").state_dict()
    with pytest.raises(ValueError):
        BinaryRelax(tiny_net(), "binary").load_state_dict(state)
    with pytest.raises(ValueError):
        BinaryRelax(tiny_net(), "ternary", method="BC").load_state_dict(state)


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes, each a brighter quadrant of an 8x8 image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.rand(n, 3, 8, 8, generator=g)
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 0.6
    return x, y


@pytest.mark.parametrize("scheme,max_values", [("binary", 2), ("ternary", 3), ("4bit", 15)])
def test_short_br_run_ends_quantized(scheme: str, max_values: int) -> None:
    torch.manual_seed(0)
    net = tiny_net()
    br = BinaryRelax(net, scheme, rho=1.5, hard_epoch=5)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x_all, y_all = synthetic(1024, seed=1)
    for epoch in range(8):
        for i in range(0, 1024, 32):  # 32 steps per epoch, 256 in all
            opt.zero_grad(set_to_none=True)
            with br.relaxed():
                F.cross_entropy(net(x_all[i:i + 32]), y_all[i:i + 32]).backward()
            opt.step()
        br.end_epoch(epoch)
    assert br.phase() == 2 and br.selectable()
    deployed = br.deployed_tensors()
    for name in br.names:
        values = torch.unique(deployed[name])
        nonzero = values[values != 0]
        if scheme == "binary":
            assert nonzero.numel() == 2 and torch.equal(nonzero.abs()[0], nonzero.abs()[1])
        elif scheme == "ternary":
            assert values.numel() == 3
        else:
            assert values.numel() <= max_values and (values == 0).any()
    x_test, y_test = synthetic(256, seed=2)
    with br.deployed():
        acc = (net.eval()(x_test).argmax(1) == y_test).float().mean().item()
    assert acc > 0.5  # it learned something on the deployed weights (chance: 0.25)
    sp = summary(deployed, br.names)
    size = size_report(deployed, br.names, scheme)
    assert 0.0 <= sp["weight"] <= 100.0 and len(sp["layers"]) == 2
    assert size["compression"] > 1.0
    assert size["bits_per_quantized_weight"] == {"binary": 1.0, "ternary": 2.0, "4bit": 4.0}[scheme]
    assert select_quantized(net) == br.names
