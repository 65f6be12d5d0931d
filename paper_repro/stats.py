"""Uncertainty of measured accuracies and sparsities, and the rule that turns a comparison into
holds / fails / inconclusive.

Why: a 95% interval over noise seeds alone has zero width for a deterministic model and ignores that
the test images are a sample; a verdict that compares two runs must know whether the difference it
sees is larger than that uncertainty. Every interval here combines both sources:

* test-set sampling: the Wilson score interval of the proportion on the n test images;
* noise seeds: the t-interval of the mean over the k seeds (only when k >= 2 and the spread is > 0);
* combined in quadrature on each side: half = sqrt(wilson_half^2 + seed_half^2).

Two separately trained runs also differ by their training seeds, which no evaluation of one run can
measure: a comparison of accuracies between runs adds, to each arm, a declared training-seed standard
deviation (TRAINING_SEED_SD_PP) in quadrature. A single run's own interval (model cards, reported numbers,
whose tolerances already allow for it) leaves it out.

A count over structural units (zero channels among all (layer, input channel) pairs) gets the Wilson
interval of that count: a deliberately simple stand-in for the training-seed spread we cannot afford to
measure (it treats the units as exchangeable). Weight sparsity against the same network before training
is compared layer by layer instead: a quantizer's per-layer threshold (4-bit: max|W|/15) ties every weight of
a layer together, so the layers, not the weights, are the units (``compare_paired_layers``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

LEVEL = 0.95
#: Training-seed standard deviation (pp) of an accuracy, added to each arm when two trained runs are compared:
#: the low end of the 0.5-1 pp seed-to-seed spread of PGD-AT ResNet20 on CIFAR-10 (claims.yaml, Tolerances).
TRAINING_SEED_SD_PP = 0.5
INTERVAL_RULE = ("95% interval = Wilson interval of the test-set sampling (n images) combined in quadrature with "
                 "the t-interval of the spread over noise seeds (k >= 2) and, when two trained runs are compared, "
                 f"a training-seed SD of {TRAINING_SEED_SD_PP:g} pp per run; sparsities use the Wilson interval of "
                 "the zero count over its units (channels or weights), and weight sparsity against the untrained "
                 "network the t-interval over layers of the paired per-layer change (size-weighted)")
DECISION_RULE = ("a comparison holds when the 95% interval of the difference (halves combined in quadrature) lies "
                 "entirely on the claimed side of its threshold, fails when it lies entirely on the other side, "
                 "and is inconclusive at this scale otherwise (always when neither arm shows any effect); a claim "
                 "holds when all its comparisons hold, fails when any fails, and is inconclusive otherwise")

HOLDS, FAILS, INCONCLUSIVE = "holds", "fails", "inconclusive"


def _z(level: float = LEVEL) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def _t(df: int, level: float = LEVEL) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def wilson(successes: float, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval, in %, of ``successes`` out of ``n``."""
    if n <= 0:
        raise ValueError(f"wilson: n must be >= 1, got {n}")
    p, z = successes / n, _z(level)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def accuracy_stats(correct: np.ndarray) -> dict[str, Any]:
    """One accuracy entry's numbers in % (2 decimals) from a (seeds, n) bool array: mean, sample std and
    t-interval over seeds (``ci95``; the Wilson interval when one seed ran), and the Wilson interval of the
    test-set sampling (``ci95_wilson``)."""
    k, n = correct.shape
    counts = correct.sum(axis=1)
    pct = 100.0 * counts / n
    mean = float(pct.mean())
    lo_w, hi_w = wilson(mean * n / 100, n)
    if k >= 2:
        std = float(pct.std(ddof=1))
        half = _t(k - 1) * std / math.sqrt(k)
        ci, method, std_out = (max(0.0, mean - half), min(100.0, mean + half)), "t over seeds", round(std, 2)
    else:
        ci, method, std_out = (lo_w, hi_w), "wilson (one seed)", None
    return {"mean": round(mean, 2), "std": std_out, "ci95": [round(ci[0], 2), round(ci[1], 2)], "ci_method": method,
            "ci95_wilson": [round(lo_w, 2), round(hi_w, 2)],
            "per_seed": [round(float(p), 2) for p in pct], "correct": [int(c) for c in counts]}


@dataclass(frozen=True)
class Estimate:
    """A percentage with its 95% interval and where the interval comes from."""

    value: float
    lo: float
    hi: float
    how: str

    @property
    def interval(self) -> list[float]:
        return [round(self.lo, 2), round(self.hi, 2)]


def accuracy_estimate(per_seed: Sequence[float], n: int, level: float = LEVEL, training_sd: float = 0.0) -> Estimate:
    """Mean accuracy (%) over seeds with the combined sampling + seed interval (see the module doc); with
    ``training_sd`` (pp) also the spread a different training seed would give."""
    k = len(per_seed)
    if k == 0:
        raise ValueError("accuracy_estimate: no per-seed values")
    mean = sum(per_seed) / k
    w_lo, w_hi = wilson(mean / 100 * n, n, level)
    seed_half = 0.0
    if k >= 2:
        sd = math.sqrt(sum((p - mean) ** 2 for p in per_seed) / (k - 1))
        seed_half = _t(k - 1, level) * sd / math.sqrt(k)
    training_half = _z(level) * training_sd
    lo = mean - math.hypot(mean - w_lo, seed_half, training_half)
    hi = mean + math.hypot(w_hi - mean, seed_half, training_half)
    how = (f"Wilson n={n}" + (f" + t over {k} seeds" if k >= 2 else " (1 seed)")
           + (f" + training-seed SD {training_sd:g} pp" if training_sd else ""))
    return Estimate(mean, max(0.0, lo), min(100.0, hi), how)


def count_estimate(zeros: int, total: int, level: float = LEVEL) -> Estimate:
    """A sparsity (%) from a count of zero units, with the Wilson interval of that count."""
    lo, hi = wilson(zeros, total, level)
    return Estimate(100.0 * zeros / total, lo, hi, f"Wilson over {total:,} units")


@dataclass(frozen=True)
class Comparison:
    """b - a against a threshold: the claim is that ``b - a > threshold`` (``direction`` +1) or
    ``b - a < threshold`` (``direction`` -1)."""

    difference: float
    lo: float
    hi: float
    threshold: float
    outcome: str

    def as_dict(self) -> dict[str, float | str]:
        return {"difference": round(self.difference, 2), "difference_ci95": [round(self.lo, 2), round(self.hi, 2)],
                "threshold": self.threshold, "outcome": self.outcome}


def compare(a: Estimate, b: Estimate, threshold: float = 0.0, direction: int = 1) -> Comparison:
    """Decide "b - a beyond threshold in ``direction``" from the two intervals (module doc, DECISION_RULE).
    With no effect in either arm (both exactly 0) the answer is inconclusive whatever the intervals."""
    diff = b.value - a.value
    lo = diff - math.hypot(a.hi - a.value, b.value - b.lo)
    hi = diff + math.hypot(a.value - a.lo, b.hi - b.value)
    outcome = INCONCLUSIVE if a.value == 0 and b.value == 0 else decide(lo, hi, threshold, direction)
    return Comparison(diff, lo, hi, threshold, outcome)


def decide(lo: float, hi: float, threshold: float, direction: int) -> str:
    """DECISION_RULE for an interval [lo, hi] of b - a."""
    if direction > 0:
        return HOLDS if lo > threshold else FAILS if hi < threshold else INCONCLUSIVE
    return HOLDS if hi < threshold else FAILS if lo > threshold else INCONCLUSIVE


def compare_paired_layers(sizes: Sequence[int], a: Sequence[float], b: Sequence[float], threshold: float = 0.0,
                          direction: int = 1, level: float = LEVEL) -> Comparison:
    """Decide "b - a beyond threshold" for a share (%) measured per layer in both arms of the same network:
    the difference of the size-weighted means, with the t-interval (layers - 1 df) of its cluster-robust
    standard error over the per-layer differences. Fewer than two layers, or no effect in either arm:
    inconclusive."""
    if not (len(sizes) == len(a) == len(b)) or not any(s > 0 for s in sizes):
        raise ValueError("compare_paired_layers: one size and one share per layer in each arm, some size > 0")
    layers = [(s, x, y) for s, x, y in zip(sizes, a, b) if s > 0]
    total = float(sum(s for s, _, _ in layers))
    weights = [s / total for s, _, _ in layers]
    diffs = [y - x for _, x, y in layers]
    diff = sum(w * d for w, d in zip(weights, diffs))
    n = len(layers)
    if n < 2:  # no spread to measure: the interval is every possible difference of two shares
        return Comparison(diff, -100.0, 100.0, threshold, INCONCLUSIVE)
    se = math.sqrt(n / (n - 1) * sum((w * (d - diff)) ** 2 for w, d in zip(weights, diffs)))
    half = _t(n - 1, level) * se
    lo, hi = diff - half, diff + half
    outcome = INCONCLUSIVE if not any(x for _, x, _ in layers) and not any(y for _, _, y in layers) else decide(
        lo, hi, threshold, direction)
    return Comparison(diff, lo, hi, threshold, outcome)


def combine(outcomes: Sequence[str]) -> str | None:
    """A claim over several comparisons: fails if any fails, holds if all hold, else inconclusive."""
    if not outcomes:
        return None
    if FAILS in outcomes:
        return FAILS
    return HOLDS if all(o == HOLDS for o in outcomes) else INCONCLUSIVE
