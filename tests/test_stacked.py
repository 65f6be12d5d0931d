"""Stacked training (issue 14): K models as one grouped network give the weights and outputs of the K
separate models (same seeds), including the members of an En_k ensemble computed in one pass."""
from __future__ import annotations

import pytest
import torch

from paper_repro import train as train_mod
from paper_repro.config import AttackSettings, Experiment
from paper_repro.losses import objective_for
from paper_repro.models import build
from paper_repro.quant import BinaryRelax
from paper_repro.stacked import stack_models, stack_state_dicts, unstack_models, unstack_state_dict
from paper_repro.stacked_step import StackedRelax, check_objectives, stacked_pgd, stacked_train_step

pytestmark = pytest.mark.usefixtures("single_thread")

# plain, noisy single-member and a two-member ensemble; different seeds; 4-bit, ternary and float
MODELS = [("resnet8", 0, "4bit"), ("en1resnet8", 1, "ternary"), ("en2resnet8", 2, "none")]
ATTACK = AttackSettings(eps=0.031, step=0.007, steps=3, random_start=True)


def separate_models(dtype=torch.float32, channels_last=False):
    models = [build(name, seed=seed).to(dtype) for name, seed, _ in MODELS]
    return [m.to(memory_format=torch.channels_last) if channels_last else m for m in models]


def batch(n=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def assert_same_weights(stacked, models, atol):
    for mine, theirs in zip(unstack_models(stacked), models):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key].to(b[key].dtype), b[key], atol=atol, rtol=0, msg=key)


def test_state_dicts_round_trip_exactly():
    models = separate_models()
    stacked = stack_models(models)
    assert stacked.groups == 4 and stacked.stem.weight.shape == (4 * 16, 3, 3, 3) and stacked.stem.groups == 4
    for model, back in zip(models, unstack_models(stacked)):
        a, b = model.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert [s.seed for s in model._sources] == [s.seed for s in back._sources]
    states = unstack_state_dict(stack_state_dicts([m.state_dict() for m in models]), [1, 1, 2])
    assert all(torch.equal(states[2][k], models[2].state_dict()[k]) for k in states[2])


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("noise_std", ["batch", "sample"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_input_gradient_match_separate_models(mode, noise_std, channels_last):
    models = separate_models(channels_last=channels_last)
    stacked = stack_models(models)
    if channels_last:
        stacked = stacked.to(memory_format=torch.channels_last)
    xs = [batch(seed=i)[0] for i in range(3)]  # every model its own images
    for m in models:
        getattr(m, mode)().set_noise_std(noise_std).seed_noise(7)
    getattr(stacked, mode)().set_noise_std(noise_std).seed_noise(7)
    x = torch.cat(xs).requires_grad_(True)
    out = stacked(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    for i, (m, xi) in enumerate(zip(models, xs)):
        xi = xi.clone().requires_grad_(True)
        ref = m(xi)
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), xi)
        torch.testing.assert_close(out[8 * i:8 * (i + 1)], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad[8 * i:8 * (i + 1)], ref_grad, atol=1e-5, rtol=1e-4)


def test_noise_streams_follow_each_model():
    """Second and third passes too: every member's generator advances as it would alone."""
    models = separate_models()
    stacked = stack_models(models).eval().seed_noise([3, 4, 5])
    for m, seed in zip(models, (3, 4, 5)):
        m.eval().seed_noise(seed)
    x, _ = batch()
    for _ in range(3):
        with torch.no_grad():
            torch.testing.assert_close(stacked(x.repeat(3, 1, 1, 1)), torch.cat([m(x) for m in models]),
                                       atol=1e-5, rtol=1e-5)


def relax_for(model, scheme):
    return BinaryRelax(model, None if scheme == "none" else scheme, method="BR", eta0=1.0, rho=2.0, hard_epoch=1)


@pytest.mark.parametrize("loss", ["natural", "pgd_at", "tradeoff"])
def test_training_steps_match_separate_runs(loss):
    """BR phase 1, then phase 2 after end_epoch: SGD with momentum and weight decay, PGD random starts and
    BN statistics all follow the separate runs (float64, so no sign of a PGD gradient can flip)."""
    dtype = torch.float64
    models = separate_models(dtype)
    stacked = stack_models(models)
    relaxes = [relax_for(m, q) for m, (_, _, q) in zip(models, MODELS)]
    stacked_relax = StackedRelax(stacked, [relax_for(build(n, seed=s), q) for n, s, q in MODELS])
    weights = {"w_adv": 8.0, "w_nat": 1.0} if loss == "tradeoff" else {}
    objectives = [objective_for(Experiment(name=f"m{i}", model=MODELS[i][0], loss=loss,
                                           loss_params=weights if i == 1 else {}), ATTACK) for i in range(3)]
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    opts = [torch.optim.SGD(m.parameters(), **sgd) for m in models]
    stacked_opt = torch.optim.SGD(stacked.parameters(), **sgd)
    gens = [torch.Generator().manual_seed(11) for _ in models]
    stacked_gens = [torch.Generator().manual_seed(11) for _ in models]
    for m in models:
        m.seed_noise(5)
    stacked.seed_noise(5)
    for step in range(3):
        x, y = batch(seed=100 + step, dtype=dtype)
        losses = [train_mod.train_step(m, r, o, opt, x, y, g, False)[0]
                  for m, r, o, opt, g in zip(models, relaxes, objectives, opts, gens)]
        stacked_losses, _ = stacked_train_step(stacked, stacked_relax, objectives, stacked_opt, x, y, stacked_gens,
                                               False)
        torch.testing.assert_close(torch.stack(stacked_losses), torch.stack(losses), atol=1e-9, rtol=1e-9)
        if step == 1:  # BR phase 2 from here on
            for r in relaxes:
                r.end_epoch(0)
            stacked_relax.end_epoch(0)
    assert_same_weights(stacked, models, atol=1e-9)
    with stacked_relax.deployed():
        deployed = [m.state_dict() for m in unstack_models(stacked)]
    for model, relax, dep in zip(models, relaxes, deployed):
        ref = relax.deployed_tensors()
        assert all(torch.allclose(dep[k], ref[k], atol=1e-9, rtol=0) for k in ref)


def test_float32_training_steps_stay_close():
    """In fp32 the grouped kernels round differently; a few PGD-AT steps still agree closely."""
    models = separate_models()
    stacked = stack_models(models)
    relaxes = [relax_for(m, "none") for m in models]
    stacked_relax = StackedRelax(stacked, [relax_for(build(n, seed=s), "none") for n, s, _ in MODELS])
    objectives = [objective_for(Experiment(name=f"m{i}", model=MODELS[i][0], loss="pgd_at"), ATTACK)
                  for i in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    stacked_opt = torch.optim.SGD(stacked.parameters(), lr=0.05, momentum=0.9)
    gens = [torch.Generator().manual_seed(1) for _ in models]
    stacked_gens = [torch.Generator().manual_seed(1) for _ in models]
    for step in range(2):
        x, y = batch(seed=step)
        for m, r, o, opt, g in zip(models, relaxes, objectives, opts, gens):
            train_mod.train_step(m, r, o, opt, x, y, g, False)
        stacked_train_step(stacked, stacked_relax, objectives, stacked_opt, x, y, stacked_gens, False)
    assert_same_weights(stacked, models, atol=1e-4)


def test_stacked_pgd_matches_attacks_pgd():
    from paper_repro import attacks
    models = separate_models(torch.float64)
    stacked = stack_models(models).seed_noise(2)
    x, y = batch(dtype=torch.float64)
    seen = []  # the stacked attack, too, runs with the parameters frozen (attacks.attack_mode)
    hook = stacked.register_forward_pre_hook(lambda m, args: seen.append(any(p.requires_grad for p in m.parameters())))
    adv = stacked_pgd(stacked, x.repeat(3, 1, 1, 1), y.repeat(3), ATTACK,
                      [torch.Generator().manual_seed(9) for _ in models])
    hook.remove()
    assert seen and not any(seen) and all(p.requires_grad for p in stacked.parameters())
    for i, m in enumerate(models):
        ref = attacks.pgd(m.seed_noise(2), x, y, eps=ATTACK.eps, step=ATTACK.step, steps=ATTACK.steps,
                          generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(adv[8 * i:8 * (i + 1)], ref, atol=1e-12, rtol=0)


def test_incompatible_inputs_fail_with_one_line():
    with pytest.raises(ValueError, match="share depth"):
        stack_models([build("resnet8"), build("resnet14")])
    natural = objective_for(Experiment(name="a", model="resnet8", loss="natural"), ATTACK)
    pgd_at = objective_for(Experiment(name="b", model="resnet8", loss="pgd_at"), ATTACK)
    trades = objective_for(Experiment(name="c", model="resnet8", loss="trades"), ATTACK)
    with pytest.raises(ValueError, match="one loss kind"):
        check_objectives([natural, pgd_at])
    with pytest.raises(ValueError, match="one loss kind"):
        check_objectives([trades])
    with pytest.raises(ValueError, match="expected \\(K\\*B"):
        stack_models([build("resnet8"), build("resnet8")])(torch.rand(3, 3, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stacked_training_step_matches_on_cuda():
    """The grouped kernels of the GPU (fp32, TF32 off) follow the separate models too."""
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        models = [m.cuda().to(memory_format=torch.channels_last) for m in separate_models()]
        stacked = stack_models(models).to(memory_format=torch.channels_last)
        relaxes = [relax_for(m, q) for m, (_, _, q) in zip(models, MODELS)]
        stacked_relax = StackedRelax(stacked, [relax_for(build(n, seed=s), q) for n, s, q in MODELS])
        objectives = [objective_for(Experiment(name=f"m{i}", model=MODELS[i][0], loss="natural"), ATTACK)
                      for i in range(3)]
        opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
        stacked_opt = torch.optim.SGD(stacked.parameters(), lr=0.05, momentum=0.9)
        x, y = batch()
        x, y = x.cuda().contiguous(memory_format=torch.channels_last), y.cuda()
        for m, r, o, opt in zip(models, relaxes, objectives, opts):
            train_mod.train_step(m, r, o, opt, x, y, None, False)
        stacked_train_step(stacked, stacked_relax, objectives, stacked_opt, x, y, [None] * 3, False)
        assert_same_weights(stacked, models, atol=1e-4)
