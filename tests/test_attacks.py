"""Attacks: invariants, strength sanity checks on a model trained here, agreement with torchattacks,
the reference C&W re-derived by hand, batching, EOT and the AutoAttack wrapper."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paper_repro import attacks as A
from paper_repro.models import build

N_CLASSES = 10


pytestmark = pytest.mark.usefixtures("single_thread")


class TinyNet(nn.Module):
    """Small conv net with BN (so eval vs train mode matters)."""

    def __init__(self, classes: int = N_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv1(x)))
        h = F.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable 16x16 images: one smooth prototype per class plus pixel noise, in [0, 1]."""
    g = torch.Generator().manual_seed(1234)
    protos = F.interpolate(torch.rand(N_CLASSES, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = (0.5 + 0.3 * protos[y] + 0.08 * torch.randn(n, 3, 16, 16, generator=g)).clamp(0, 1)
    return x, y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A TinyNet trained for a few seconds on the synthetic task, with held-out test images."""
    torch.manual_seed(0)
    model = TinyNet()
    x, y = synthetic(2000, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(4):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 100):
            idx = perm[i:i + 100]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    xt, yt = synthetic(256, seed=2)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.95, f"tiny model did not learn the synthetic task (acc {acc:.2f})"
    return model, xt, yt


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        was = model.training
        model.eval()
        acc = (model(x).argmax(1) == y).float().mean().item()
        model.train(was)
    return acc


ATTACK_CALLS = {
    "fgsm": lambda m, x, y, eps: A.fgsm(m, x, y, eps=eps),
    "ifgsm20": lambda m, x, y, eps: A.ifgsm20(m, x, y, eps=eps),
    "pgd": lambda m, x, y, eps: A.pgd(m, x, y, eps=eps, step=eps / 4, steps=5, restarts=2,
                                      generator=torch.Generator().manual_seed(0)),
    "cw_linf": lambda m, x, y, eps: A.cw_linf(m, x, y, eps=eps, step=eps / 4, steps=5),
}


@pytest.mark.parametrize("name", sorted(ATTACK_CALLS))
def test_adversarials_in_ball_input_untouched_mode_and_params_restored(trained, name):
    model, x, y = trained
    x, y = x[:64], y[:64]
    x_before = x.clone()
    model.train()
    model.bn.eval()  # a mixed mode must come back exactly
    model.fc.weight.requires_grad_(False)
    running_mean = model.bn.running_mean.clone()
    eps = 0.05
    try:
        adv = ATTACK_CALLS[name](model, x, y, eps)
        assert adv.shape == x.shape and adv.dtype == x.dtype
        assert (adv - x).abs().max().item() <= eps + 1e-6
        assert adv.min().item() >= 0.0 and adv.max().item() <= 1.0
        assert torch.equal(x, x_before)
        assert model.training and not model.bn.training and model.conv1.training
        assert torch.equal(model.bn.running_mean, running_mean)  # ran in eval mode
        assert all(p.grad is None for p in model.parameters())
        assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, True, True, False, True]
        assert not adv.requires_grad
    finally:
        model.fc.weight.requires_grad_(True)
        model.eval()


def _trades(m, x, y, eps):
    from paper_repro.losses import trades_attack
    return trades_attack(m, x, eps=eps, step=eps / 4, steps=2, generator=torch.Generator().manual_seed(0))


#: every other attack entry point: each enters attack_mode on its own
FROZEN_CALLS = {**ATTACK_CALLS,
                "cw_ref": lambda m, x, y, eps: A.cw_ref(m, x, y, eps=eps, steps=2),
                "input_gradient": lambda m, x, y, eps: A.input_gradient(m, x, y),
                "trades": _trades,
                "autoattack": lambda m, x, y, eps: A.autoattack(m, x, y, eps=eps, version="standard", steps=2)}


@pytest.mark.parametrize("name", sorted(FROZEN_CALLS))
def test_attacks_run_with_parameters_frozen(trained, name):
    """No forward pass of an attack sees a parameter that requires grad (torch.compile's backward would compute
    every weight gradient), and a failing attack still restores the flags."""
    if name == "autoattack":
        pytest.importorskip("torchattacks")
    ATTACK_CALLS = FROZEN_CALLS  # noqa: N806 - the same calls as above, plus the other entry points
    model, x, y = trained
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(any(p.requires_grad for p in m.parameters())))
    try:
        ATTACK_CALLS[name](model, x[:16], y[:16], 0.05)
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert all(p.requires_grad for p in model.parameters())

    def broken(m, args):
        raise RuntimeError("boom")
    hook = model.register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ATTACK_CALLS[name](model, x[:16], y[:16], 0.05)
    finally:
        hook.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_pgd_at_least_as_strong_as_fgsm_and_breaks_everything_at_large_eps(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    for eps in (0.03, 0.06):
        acc_fgsm = accuracy(model, A.fgsm(model, x, y, eps=eps), y)
        acc_pgd = accuracy(model, A.pgd(model, x, y, eps=eps, step=eps / 8, steps=20, random_start=False), y)
        assert acc_pgd <= acc_fgsm <= clean
    assert acc_pgd < clean  # the attack does something at this strength
    # gradient-masking sanity check: an unbounded-ish attack must win
    assert accuracy(model, A.pgd(model, x, y, eps=0.5, step=0.05, steps=20), y) <= 0.02
    assert accuracy(model, A.cw_linf(model, x, y, eps=0.5, step=0.05, steps=20), y) <= 0.02


def test_pgd_matches_torchattacks_pgd(trained):
    import torchattacks

    model, x, y = trained
    eps, alpha, steps = 0.02, 0.005, 10
    ours = A.pgd(model, x, y, eps=eps, step=alpha, steps=steps, random_start=False)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert 0.1 < accuracy(model, theirs, y) < 0.9  # a regime where the comparison means something
    assert abs(accuracy(model, ours, y) - accuracy(model, theirs, y)) <= 0.02
    assert (ours - theirs).abs().gt(1e-4).float().mean().item() < 0.02  # same iterates up to rounding
    torch.manual_seed(0)
    theirs_rs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    ours_rs = A.pgd(model, x, y, eps=eps, step=alpha, steps=steps, random_start=True,
                    generator=torch.Generator().manual_seed(1))
    assert abs(accuracy(model, ours_rs, y) - accuracy(model, theirs_rs, y)) <= 0.06


def test_random_start_is_seeded_by_the_generator(trained):
    model, x, y = trained
    run = lambda seed: A.pgd(model, x[:16], y[:16], eps=0.03, steps=2, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_restarts_keep_the_per_example_worst_case(trained):
    model, x, y = trained
    eps, kwargs = 0.035, dict(step=0.01, steps=3, random_start=True)
    g = torch.Generator().manual_seed(5)
    singles = [A.pgd(model, x, y, eps=eps, generator=g, **kwargs) for _ in range(3)]
    with torch.no_grad():
        fooled_any = torch.stack([model(a).argmax(1) != y for a in singles]).any(0)
    combined = A.pgd(model, x, y, eps=eps, restarts=3, generator=torch.Generator().manual_seed(5), **kwargs)
    with torch.no_grad():
        fooled = model(combined).argmax(1) != y
    assert torch.equal(fooled, fooled_any)
    assert fooled_any.any()


def test_bf16_autocast_and_channels_last(trained):
    model, x, y = trained
    xs = x[:32].contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adv = A.pgd(model, xs, y[:32], eps=0.03, step=0.01, steps=3)
        adv_cw = A.cw_ref(model, xs, y[:32], steps=3)
    assert adv.dtype == torch.float32 and (adv - xs).abs().max().item() <= 0.03 + 1e-6
    assert torch.isfinite(adv_cw).all()


# ---------------------------------------------------------------- cw_ref (reference variant)

class Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def linear_case() -> tuple[Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 2, 2, generator=g)
    weight = torch.randn(4, 12, generator=g)
    bias = -(x.flatten(1) @ weight.t()).mean(0)  # centre the logits: small top-2 margins (about 0.2)
    model = Linear(weight, bias)
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 0.01  # no ties
    return model, x, torch.zeros(2, dtype=torch.long)


def reference_by_hand(model: Linear, x: torch.Tensor, eps: float, lr: float, steps: int, c: float,
                      aliased: bool = False) -> torch.Tensor:
    """The reference's per-image procedure with the Adam update written out (PyTorch 0.4 Adam)."""
    W, b = model.fc.weight.detach(), model.fc.bias.detach()
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    out = []
    for img in x:
        x0 = img.flatten()
        z = W @ x0 + b
        pred = int(z.argmax())
        runner = int(z.topk(2).indices[1])
        w = x0.clone()
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        best_w, best_loss = x0.clone(), math.inf
        for t in range(1, steps + 1):
            zw = W @ w + b
            margin = float(zw[pred] - zw[runner])
            dist = 0.0 if aliased else float(((w - x0) ** 2).sum())
            loss = dist + c * max(margin, 0.0)
            grad = (torch.zeros_like(w) if aliased else 2 * (w - x0))
            if margin > 0:
                grad = grad + c * (W[pred] - W[runner])
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad * grad
            step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            w = w - step_size * m / (v.sqrt() + adam_eps)
            if loss < best_loss:  # the reference stores w AFTER the step
                best_loss, best_w = loss, w.clone()
        base = w if aliased else x0
        out.append((base + eps * (best_w - base)).view_as(img))
    return torch.stack(out)


@pytest.mark.parametrize("lr,steps", [(6e-4, 50), (0.02, 40)])
@pytest.mark.parametrize("aliased", [False, True])
def test_cw_ref_matches_the_reference_procedure_by_hand(lr, steps, aliased):
    model, x, y = linear_case()
    expected = reference_by_hand(model, x, eps=0.031, lr=lr, steps=steps, c=10.0, aliased=aliased)
    got = A.cw_ref(model, x, y, eps=0.031, lr=lr, steps=steps, c=10.0,
                   variant="aliased" if aliased else "spec")
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_cw_ref_hinge_switches_off_in_the_larger_lr_case():
    """Guard that the hand-worked case exercises the best-w bookkeeping (margin crosses zero)."""
    model, x, y = linear_case()
    adv_w = A.cw_ref(model, x, y, eps=1.0, lr=0.02, steps=40)  # eps=1 returns w_best itself
    with torch.no_grad():
        z0, z = model(x), model(adv_w)
    pred, runner = z0.argmax(1), z0.topk(2, dim=1).indices[:, 1]
    assert ((z.gather(1, pred[:, None]) - z.gather(1, runner[:, None])) <= 0.05).all()


def test_cw_ref_defaults_are_the_paper_settings_and_no_clamp():
    model, x, y = linear_case()
    assert (A.CW_REF_EPS, A.CW_REF_LR, A.CW_REF_STEPS, A.CW_REF_C) == (0.031, 6e-4, 50, 10.0)
    expected = reference_by_hand(model, x, eps=0.031, lr=6e-4, steps=50, c=10.0)
    assert torch.allclose(A.cw_ref(model, x, y), expected, atol=1e-6, rtol=0)
    # no clamp: an image at the top of the range may leave [0, 1]
    ones = torch.ones(1, 3, 2, 2)
    adv = A.cw_ref(model, ones, y[:1], eps=1.0, lr=0.05, steps=5)
    assert (adv > 1).any()


def test_cw_ref_batched_equals_per_image_loop(trained):
    model, x, y = trained
    x, y = x[:6], y[:6]
    batched = A.cw_ref(model, x, y, lr=0.01, steps=15)
    looped = torch.cat([A.cw_ref(model, x[i:i + 1], y[i:i + 1], lr=0.01, steps=15) for i in range(len(x))])
    assert torch.allclose(batched, looped, atol=1e-6, rtol=0)
    assert (batched - x).abs().max() > 0


def test_cw_ref_reference_runner_up_quirk():
    """With every other logit below -1, the reference's runner-up is the prediction itself: no attack."""
    weight = torch.zeros(3, 12)
    weight[0] = 1.0
    model = Linear(weight, torch.tensor([0.0, -2.0, -3.0]))
    x = torch.full((1, 3, 2, 2), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    assert torch.equal(A.cw_ref(model, x, y, runner_up="ref", lr=0.05), x)
    assert not torch.equal(A.cw_ref(model, x, y, runner_up="clean", lr=0.05), x)


def test_cw_ref_restores_noise_std_and_modes():
    model = build("en1resnet8", seed=0).train()
    x, y = synthetic(4, seed=3)
    adv = A.cw_ref(model, x, y, steps=2)
    assert model.noise_std == "batch" and model.training and adv.shape == x.shape
    with pytest.raises(ValueError):
        A.cw_ref(model, x, y, variant="other")


# ---------------------------------------------------------------- EOT

def test_eot_gradient_is_the_average_of_single_draws():
    model = build("en1resnet8", seed=0)  # noise is the only randomness (eval mode, fixed weights)
    x, y = synthetic(4, seed=4)
    model.seed_noise(11)
    averaged = A.input_gradient(model, x, y, eot=3)
    model.seed_noise(11)
    singles = [A.input_gradient(model, x, y) for _ in range(3)]
    assert torch.allclose(averaged, torch.stack(singles).mean(0), atol=1e-6)
    assert not torch.allclose(singles[0], singles[1], atol=1e-6)  # the draws do differ
    model.set_noise(False)
    assert torch.allclose(A.input_gradient(model, x, y, eot=3), A.input_gradient(model, x, y), atol=1e-6)


def test_attacks_accept_eot_on_a_noisy_model():
    model = build("en1resnet8", seed=0)
    x, y = synthetic(4, seed=5)
    for adv in (A.fgsm(model, x, y, eot=2), A.pgd(model, x, y, steps=2, eot=2), A.cw_ref(model, x, y, steps=2, eot=2)):
        assert adv.shape == x.shape and torch.isfinite(adv).all()


# ---------------------------------------------------------------- settings, registry, validation

def test_paper_settings_are_the_defaults():
    assert (A.TRAIN_PGD_EPS, A.TRAIN_PGD_STEP, A.TRAIN_PGD_STEPS, A.TRAIN_PGD_RANDOM_START) == (0.031, 0.007, 10, True)
    assert A.FGSM_EPS == 0.031
    assert (A.IFGSM20_EPS, A.IFGSM20_STEP, A.IFGSM20_STEPS) == (0.031, 1 / 255, 20)


def test_ifgsm20_equals_pgd_with_its_settings(trained):
    model, x, y = trained
    expected = A.pgd(model, x[:16], y[:16], eps=0.031, step=1 / 255, steps=20, random_start=False)
    assert torch.equal(A.ifgsm20(model, x[:16], y[:16]), expected)


def test_registry_lists_every_attack():
    assert set(A.ATTACKS) == {"fgsm", "ifgsm20", "pgd", "cw_ref", "cw_linf", "autoattack"}
    assert all(callable(f) for f in A.ATTACKS.values())
    with pytest.raises(TypeError):
        A.ATTACKS["new"] = A.fgsm  # read-only


def test_invalid_arguments_raise(trained):
    model, x, y = trained
    with pytest.raises(ValueError):
        A.pgd(model, x[:2], y[:2], loss="hinge")
    with pytest.raises(ValueError):
        A.pgd(model, x[:2], y[:3])
    with pytest.raises(ValueError):
        A.fgsm(model, x[:2], y[:2], eot=0)
    with pytest.raises(ValueError):
        A.autoattack(model, x[:2], y[:2], eps=0.03, version="plus")


# ---------------------------------------------------------------- AutoAttack

def test_autoattack_standard_on_a_deterministic_model(trained):
    model, x, y = trained
    x, y = x[:8], y[:8]
    torch.manual_seed(99)
    expected_next = torch.rand(2)
    torch.manual_seed(99)
    model.train()
    adv = A.autoattack(model, x, y, eps=0.06, version="standard", seed=0, n_classes=N_CLASSES, steps=5)
    assert torch.equal(torch.rand(2), expected_next)  # global RNG restored
    assert model.training
    model.eval()
    assert (adv - x).abs().max().item() <= 0.06 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert accuracy(model, adv, y) <= accuracy(model, x, y)


def test_autoattack_rand_on_a_noisy_model():
    model = build("en1resnet8", seed=0)
    x, y = synthetic(4, seed=6)
    x_before = x.clone()
    adv = A.autoattack(model, x, y, eps=0.03, version="rand", seed=1, n_classes=N_CLASSES, steps=2)
    assert torch.equal(x, x_before)
    assert (adv - x).abs().max().item() <= 0.03 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_on_cuda_with_bf16_autocast_and_channels_last():
    model = build("en1resnet8", seed=0).cuda().to(memory_format=torch.channels_last)
    x, y = synthetic(8, seed=7)
    x, y = x.cuda().contiguous(memory_format=torch.channels_last), y.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for adv in (A.pgd(model, x, y, steps=3, eot=2, generator=g), A.fgsm(model, x, y),
                    A.cw_linf(model, x, y, steps=3), A.cw_ref(model, x, y, steps=3)):
            assert adv.device.type == "cuda" and adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert (A.pgd(model, x, y, steps=3) - x).abs().max().item() <= A.TRAIN_PGD_EPS + 1e-6
