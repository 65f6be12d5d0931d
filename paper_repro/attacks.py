"""White-box L-infinity attacks on pixels in [0, 1], batched (paper-spec sections 5 and 6).

All attacks take ``(model, x, y, ...)``, return a new tensor (``x`` is never modified), run the
model in eval mode (BN running statistics; the EnResNet noise stays as configured) with the parameters
frozen (``attack_mode``), restore every module's mode and flags afterwards, and take input gradients with
``torch.autograd.grad``, so the parameters' ``.grad`` is untouched. Losses are computed in fp32, so a caller
may wrap an attack in bf16 autocast. ``eot=k`` averages the input gradient
over k stochastic forward passes (Expectation over Transformation for the noisy models).

The paper's settings are the module constants below and the functions' defaults. Kept whole (~350
lines): every attack shares the same input checks, mode handling and gradient helper, and the file is
the one place to audit them against the paper.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Training attack (PGD adversarial training, spec section 5).
TRAIN_PGD_EPS = 0.031
TRAIN_PGD_STEP = 0.007
TRAIN_PGD_STEPS = 10
TRAIN_PGD_RANDOM_START = True
# Evaluation attacks (spec section 6). 0.031 is slightly below 8/255 = 0.03137.
FGSM_EPS = 0.031
IFGSM20_EPS = 0.031
IFGSM20_STEP = 1.0 / 255.0
IFGSM20_STEPS = 20
CW_REF_EPS = 0.031
CW_REF_LR = 6e-4
CW_REF_STEPS = 50
CW_REF_C = 10.0
# Adam as in the reference's PyTorch 0.4: eps is added to sqrt(v) before bias correction.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Audit attacks (not from the paper).
CW_LINF_STEP = 1.0 / 255.0
CW_LINF_STEPS = 50
AUTOATTACK_STEPS = 100  # iterations of APGD/FAB in the original AutoAttack (torchattacks' default is 10)

LOSSES = ("ce", "cw")
CW_REF_VARIANTS = ("spec", "aliased")
CW_REF_RUNNER_UP = ("clean", "ref")
AUTOATTACK_VERSIONS = ("rand", "standard")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode; restore each module's own mode on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters that require grad stop requiring it; restored on exit. An attack wants only the input
    gradient: eager autograd skips the weight gradients anyway, but torch.compile's backward computes a gradient
    for every input that requires one (a weight-gradient convolution per layer per attack step)."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)


@contextmanager
def attack_mode(model: nn.Module) -> Iterator[nn.Module]:
    """What every attack runs in: eval mode (``eval_mode``) with the parameters frozen (``frozen_parameters``)."""
    with eval_mode(model), frozen_parameters(model):
        yield model


@contextmanager
def noise_std_mode(model: nn.Module, mode: str | None) -> Iterator[nn.Module]:
    """Temporarily use per-'sample' or per-'batch' noise std on a noisy model (no-op otherwise)."""
    current = getattr(model, "noise_std", None)
    if mode is None or current is None or current == mode:
        yield model
        return
    model.set_noise_std(mode)
    try:
        yield model
    finally:
        model.set_noise_std(current)


def _check(x: Tensor, y: Tensor, eps: float, eot: int) -> Tensor:
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be (N,) with N = {x.shape[0]}, got shape {tuple(y.shape)}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not isinstance(eot, int) or eot < 1:
        raise ValueError(f"eot must be an int >= 1, got {eot!r}")
    return y.to(device=x.device, dtype=torch.long)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example C&W margin max_{j != y} z_j - z_y in fp32 (> 0 means misclassified)."""
    z = logits.float()
    z_true = z.gather(1, y[:, None]).squeeze(1)
    z_other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return z_other - z_true


def per_example_loss(logits: Tensor, y: Tensor, loss: str = "ce") -> Tensor:
    """The loss an attack ascends, per example, in fp32: 'ce' cross-entropy or 'cw' margin."""
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="none")
    if loss == "cw":
        return margin(logits, y)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def _grad(model: nn.Module, x: Tensor, y: Tensor, loss: str, eot: int) -> Tensor:
    """d(sum of losses)/dx averaged over ``eot`` forward passes; ``x`` must require grad."""
    total = None
    with torch.enable_grad():
        for _ in range(eot):
            value = per_example_loss(model(x), y, loss).sum()
            (g,) = torch.autograd.grad(value, x)
            total = g if total is None else total.add_(g)
    return total if eot == 1 else total.div_(eot)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: str = "ce", eot: int = 1) -> Tensor:
    """Input gradient of the summed attack loss (eval mode), averaged over ``eot`` noise draws."""
    y = _check(x, y, 0.0, eot)
    with attack_mode(model):
        return _grad(model, x.detach().clone().requires_grad_(True), y, loss, eot)


def _uniform(x: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """U(-eps, eps) noise shaped like x, from ``generator`` (any device) or the global RNG."""
    device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    return u.to(x.device).mul_(2 * eps).sub_(eps)


def _pgd_run(model: nn.Module, x0: Tensor, y: Tensor, lo: Tensor, hi: Tensor, eps: float, step: float,
             steps: int, random_start: bool, loss: str, eot: int, generator: torch.Generator | None) -> Tensor:
    adv = x0.clone()
    if random_start:
        adv.add_(_uniform(x0, eps, generator)).clamp_(0.0, 1.0)
    adv.requires_grad_(True)
    for _ in range(steps):
        g = _grad(model, adv, y, loss, eot)
        with torch.no_grad():
            adv.add_(g.sign_(), alpha=step)
            adv.clamp_(lo, hi)  # projection to the eps-ball and to [0, 1] in one op
    return adv.detach()


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float = TRAIN_PGD_EPS, step: float = TRAIN_PGD_STEP,
        steps: int = TRAIN_PGD_STEPS, random_start: bool = TRAIN_PGD_RANDOM_START, restarts: int = 1,
        loss: str = "ce", eot: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Projected sign-gradient ascent (Madry PGD / IFGSM); defaults are the training attack.

    IFGSM20 is ``pgd(eps=0.031, step=1/255, steps=20, random_start=False)``. With
    ``restarts > 1`` each example keeps its worst case: misclassified in any restart beats
    correct, then the higher loss wins.
    """
    y = _check(x, y, eps, eot)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(steps, int) or steps < 0 or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps!r}, restarts={restarts!r}")
    x0 = x.detach()
    lo = (x0 - eps).clamp_(min=0.0)
    hi = (x0 + eps).clamp_(max=1.0)
    with attack_mode(model):
        best = best_wrong = best_loss = None
        for _ in range(restarts):
            adv = _pgd_run(model, x0, y, lo, hi, eps, step, steps, random_start, loss, eot, generator)
            if restarts == 1:
                return adv
            with torch.no_grad():
                logits = model(adv)
                wrong = logits.argmax(dim=1) != y
                value = per_example_loss(logits, y, loss)
            if best is None:
                best, best_wrong, best_loss = adv, wrong, value
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (value > best_loss))
            best = torch.where(better.view(-1, 1, 1, 1), adv, best)
            best_loss = torch.where(better, value, best_loss)
            best_wrong = best_wrong | wrong
        return best


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float = FGSM_EPS, eot: int = 1) -> Tensor:
    """One sign step of size eps on the cross-entropy, clamped to [0, 1] (spec section 6)."""
    return pgd(model, x, y, eps=eps, step=eps, steps=1, random_start=False, eot=eot)


def ifgsm20(model: nn.Module, x: Tensor, y: Tensor, eps: float = IFGSM20_EPS, eot: int = 1) -> Tensor:
    """IFGSM20: 20 sign steps of 1/255 projected to eps, no random start, clamped to [0, 1]."""
    return pgd(model, x, y, eps=eps, step=IFGSM20_STEP, steps=IFGSM20_STEPS, random_start=False, eot=eot)


def cw_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float = CW_REF_EPS, step: float = CW_LINF_STEP,
            steps: int = CW_LINF_STEPS, random_start: bool = True, restarts: int = 1, eot: int = 1,
            generator: torch.Generator | None = None) -> Tensor:
    """Standard CW-Linf: PGD on the C&W margin loss (the audit counterpart of ``cw_ref``)."""
    return pgd(model, x, y, eps=eps, step=step, steps=steps, random_start=random_start,
               restarts=restarts, loss="cw", eot=eot, generator=generator)


def _runner_up(model: nn.Module, x0: Tensor, clean: Tensor, pred: Tensor, how: str) -> Tensor:
    """Class the reference C&W pushes towards.

    'clean': the second-highest clean logit (paper-spec section 6).
    'ref': the reference's code: a SECOND forward pass, its top-1 unless that equals the clean
    prediction, else its top-1 after setting that logit to -1 (which is the prediction itself,
    so no attack, when every other logit is below -1).
    """
    if how == "clean":
        return clean.topk(2, dim=1).indices[:, 1]
    if how != "ref":
        raise ValueError(f"runner_up must be one of {CW_REF_RUNNER_UP}, got {how!r}")
    second = model(x0).float()
    top1 = second.argmax(dim=1)
    top2 = second.scatter(1, top1[:, None], -1.0).argmax(dim=1)
    return torch.where(top1 == pred, top2, top1)


def _hinge_grad(model: nn.Module, w: Tensor, pred: Tensor, runner: Tensor, c: float,
                eot: int) -> tuple[Tensor, Tensor]:
    """Per-image c * max(Z(w)[pred] - Z(w)[runner], 0) and its gradient w.r.t. w, averaged over eot."""
    hinge_sum = grad_sum = None
    with torch.enable_grad():
        for _ in range(eot):
            z = model(w).float()
            hinge = c * (z.gather(1, pred[:, None]) - z.gather(1, runner[:, None])).squeeze(1).clamp(min=0.0)
            (g,) = torch.autograd.grad(hinge.sum(), w)
            hinge = hinge.detach()
            hinge_sum = hinge if hinge_sum is None else hinge_sum.add_(hinge)
            grad_sum = g if grad_sum is None else grad_sum.add_(g)
    if eot > 1:
        hinge_sum.div_(eot)
        grad_sum.div_(eot)
    return hinge_sum, grad_sum


def cw_ref(model: nn.Module, x: Tensor, y: Tensor, eps: float = CW_REF_EPS, lr: float = CW_REF_LR,
           steps: int = CW_REF_STEPS, c: float = CW_REF_C, *, variant: str = "spec",
           runner_up: str = "clean", per_image_noise: bool = True, eot: int = 1) -> Tensor:
    """The reference's C&W variant ("cw_ref", NOT the standard Carlini-Wagner attack; paper-spec section 6).

    Per image: pred = clean prediction, runner = second-highest clean logit; optimise w
    (starting at x) with Adam (lr, ``steps`` iterations, PyTorch-0.4 update) on
    ||w - x||^2 + c * max(Z(w)[pred] - Z(w)[runner], 0). After each step, if the objective
    evaluated before the step is the lowest so far, w_best <- w after the step (exactly where the
    reference stores it). Result: x + eps * (w_best - x), NOT clamped to [0, 1]. The label ``y``
    is not used (only validated), as in the reference.

    Batched: Adam is elementwise and the objective a sum over images, so one Adam over the
    batch equals one optimiser per image. ``per_image_noise`` computes the EnResNet noise std
    per image during the attack, as the reference (batch size 1) did.

    ``variant="aliased"`` reproduces what the reference code computes under PyTorch 0.4, where
    w, the image it subtracts and the numpy image it rescales from share one storage: the
    distance term is identically 0 and the result is w_last + eps * (w_best - w_last).
    ``runner_up="ref"`` takes the runner-up as the reference code does (see ``_runner_up``).
    """
    y = _check(x, y, eps, eot)
    if variant not in CW_REF_VARIANTS:
        raise ValueError(f"variant must be one of {CW_REF_VARIANTS}, got {variant!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    beta1, beta2 = ADAM_BETAS
    x0 = x.detach()
    with attack_mode(model), noise_std_mode(model, "sample" if per_image_noise else None):
        with torch.no_grad():
            clean = model(x0).float()
            pred = clean.argmax(dim=1)
            runner = _runner_up(model, x0, clean, pred, runner_up)
        w = x0.clone().requires_grad_(True)
        m = torch.zeros_like(x0)
        v = torch.zeros_like(x0)
        best_w = x0.clone()
        best_loss = torch.full((x0.shape[0],), float("inf"), device=x0.device)
        for t in range(1, steps + 1):
            hinge, g = _hinge_grad(model, w, pred, runner, c, eot)
            with torch.no_grad():
                if variant == "spec":
                    diff = w - x0
                    objective = diff.square().flatten(1).sum(dim=1) + hinge
                    g.add_(diff, alpha=2.0)
                else:
                    objective = hinge
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                w.addcdiv_(m, v.sqrt().add_(ADAM_EPS), value=-step_size)
                improved = objective < best_loss
                best_loss = torch.where(improved, objective, best_loss)
                best_w = torch.where(improved.view(-1, 1, 1, 1), w, best_w)
        w = w.detach()
    base = x0 if variant == "spec" else w
    return base + eps * (best_w - base)


def autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float, version: str = "rand", seed: int = 0,
               n_classes: int | None = None, *, steps: int | None = AUTOATTACK_STEPS, verbose: bool = False) -> Tensor:
    """AutoAttack (L-inf) through torchattacks: 'rand' (APGD-CE + APGD-DLR, EOT 20) for noisy models,
    'standard' (APGD-CE, APGD-T, FAB-T, Square) for deterministic ones.

    ``n_classes`` None: the model's own number of classes (its logits' width), so CIFAR-100 models get
    APGD-T's and FAB-T's 9 target classes out of 100, not out of 10.

    ``steps`` sets the APGD/FAB iterations (100 as in the original AutoAttack; None keeps
    torchattacks' default of 10). torchattacks reseeds the global RNG; it is restored afterwards.
    """
    import torchattacks

    y = _check(x, y, eps, 1)
    if n_classes is None:
        n_classes = num_classes(model, x)
    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"version must be one of {AUTOATTACK_VERSIONS}, got {version!r}")
    x0 = x.detach().clone()
    devices = [x0.device.index if x0.device.index is not None else torch.cuda.current_device()] if x0.is_cuda else []
    with attack_mode(model), torch.random.fork_rng(devices=devices):
        attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version=version,
                                         n_classes=n_classes, seed=seed, verbose=verbose)
        if steps is not None:
            parts = getattr(getattr(attack, "_autoattack", None), "attacks", None)
            if parts is None:
                raise RuntimeError("this torchattacks version hides AutoAttack's sub-attacks; pass steps=None")
            for part in parts:
                if hasattr(part, "steps"):
                    part.steps = steps
        with torch.enable_grad():
            adv = attack(x0, y)
    return adv.detach()


def num_classes(model: nn.Module, x: Tensor) -> int:
    """Classes of ``model``: its build record (models.build), else its last Linear layer's outputs (wrappers
    included; no forward pass, so no noise stream moves), else the width of its logits on one image."""
    recorded = (getattr(model, "arch_config", None) or {}).get("num_classes")
    if isinstance(recorded, int):
        return recorded
    heads = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    if heads:
        return int(heads[-1])
    with torch.no_grad(), eval_mode(model):
        return int(model(x[:1]).shape[1])


#: Attack name -> callable(model, x, y, **settings), used by the evaluation stage.
ATTACKS: Mapping[str, Callable[..., Tensor]] = MappingProxyType({
    "fgsm": fgsm,
    "ifgsm20": ifgsm20,
    "pgd": pgd,
    "cw_ref": cw_ref,
    "cw_linf": cw_linf,
    "autoattack": autoattack,
})
