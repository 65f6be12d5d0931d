"""step_profile: kernels per step and the device's busy share, what `bench --profile` and gpu-check report."""
from __future__ import annotations

import pytest
import torch

from paper_repro import bench, config
from paper_repro.step_profile import busy_us, profile_steps


def test_busy_time_is_the_union_of_the_intervals():
    assert busy_us([]) == 0
    assert busy_us([(0, 10), (20, 25)]) == 15  # disjoint: the sum
    assert busy_us([(0, 10), (5, 15)]) == 15  # overlapping: counted once
    assert busy_us([(0, 30), (5, 15), (10, 20)]) == 30  # nested in the first
    assert busy_us([(20, 25), (0, 10), (8, 12)]) == 17  # any order


def _matmuls(k: int):
    a = torch.randn(64, 64)
    while True:
        for _ in range(k):
            a = torch.mm(a, a).tanh_()
        yield 1


def test_profile_counts_the_operator_calls_of_a_step():
    """On a CPU each top-level aten call counts once: a step of k (mm, tanh_) pairs is 2k calls."""
    for k in (1, 3):
        steps = _matmuls(k)
        next(steps)  # warmed up, as bench's loops are: the first step makes the matrix
        figures = profile_steps(steps, 4, torch.device("cpu"))
        assert figures["kernels_per_step"] == 2 * k and figures["steps"] == 4
        assert 0 < figures["busy_ms_per_step"] <= figures["wall_ms_per_step"]
        assert 0 < figures["busy_pct"] <= 100
    with pytest.raises(ValueError, match="at least one step"):
        profile_steps(_matmuls(1), 0, torch.device("cpu"))


def test_bench_profiles_every_loop_of_a_row_when_asked():
    settings = config.from_dict({"train": {"pgd": {"steps": 1}}})
    lines = []
    results = bench.run(settings, ("resnet8",), ("pgd_at",), 8, 1, 1, 8 * 6, torch.device("cpu"), log=lines.append,
                        repeats=1, profile=2)
    profile = results["pgd_at_resnet8"]["profile"]
    assert set(profile) == {"baseline", "ours"}
    # a PGD-1 step is two forward/backward passes: far more calls than the 2k of the toy above
    assert all(p["steps"] == 2 and p["kernels_per_step"] > 50 for p in profile.values())
    assert sum("profile baseline" in line for line in lines) == 1
    assert "profile" not in bench.run(settings, ("resnet8",), ("pgd_at",), 8, 1, 1, 8 * 6, torch.device("cpu"),
                                      log=lambda _: None, repeats=1)["pgd_at_resnet8"]


def test_a_failing_profile_keeps_the_rows_timings(monkeypatch):
    def broken(steps, n, device):
        raise RuntimeError("CUPTI unavailable")
    monkeypatch.setattr(bench, "profile_steps", broken)
    settings = config.from_dict({"train": {"pgd": {"steps": 1}}})
    row = bench.run(settings, ("resnet8",), ("pgd_at",), 8, 1, 1, 8 * 6, torch.device("cpu"), log=lambda _: None,
                    repeats=1, profile=2)["pgd_at_resnet8"]
    assert row["speedup"] > 0
    assert row["profile"] == {loop: {"error": "RuntimeError: CUPTI unavailable"} for loop in ("baseline", "ours")}
    from paper_repro import gpu_report
    md = "\n".join(gpu_report._bench({"result": {"results": {"pgd_at_resnet8": row}}}))
    assert "RuntimeError: CUPTI unavailable" in md


def test_bench_loops_set_the_cudnn_flag_before_each_step(monkeypatch):
    """The baseline keeps PyTorch's default (no cuDNN benchmarking), ours follows train.cudnn_benchmark, though the
    flag is process-wide and the loops interleave."""
    seen = []

    def steps(name):
        while True:
            seen.append((name, torch.backends.cudnn.benchmark))
            yield 1
    before = torch.backends.cudnn.benchmark
    try:
        loops = {"baseline": bench.with_cudnn_benchmark(steps("baseline"), False),
                 "ours": bench.with_cudnn_benchmark(steps("ours"), True)}
        bench.measure(loops, 1, 2, 2, torch.device("cpu"))
    finally:
        torch.backends.cudnn.benchmark = before
    assert seen and all(flag == (name == "ours") for name, flag in seen)
    # and bench's own loops are wired so: the baseline with PyTorch's default, ours with train.cudnn_benchmark
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8).numpy()
    labels = torch.randint(0, 10, (16,)).numpy()
    attack = config.from_dict({"train": {"pgd": {"steps": 1}}}).train.pgd
    try:
        for ours_flag in (True, False):
            settings = config.from_dict({"train": {"pgd": {"steps": 1}, "cudnn_benchmark": ours_flag}})
            base = bench._baseline_loop("resnet8", images, labels, 8, "pgd_at", attack, torch.device("cpu"))
            ours = bench._our_loop("resnet8", images, labels, 8, "pgd_at", attack, torch.device("cpu"), settings)
            torch.backends.cudnn.benchmark = True
            next(base)
            assert torch.backends.cudnn.benchmark is False
            next(ours)
            assert torch.backends.cudnn.benchmark is ours_flag
    finally:
        torch.backends.cudnn.benchmark = before
    assert config.from_dict({}).train.cudnn_benchmark is True
    assert config.from_dict({"train": {"cudnn_benchmark": False}}).train.cudnn_benchmark is False


def _linear_sgd():
    model = torch.nn.Linear(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 32)
    while True:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        yield 1


def test_a_training_steps_backward_and_optimizer_calls_count_on_a_cpu():
    """Backward ops run under autograd events and SGD's under Optimizer.step: they count, unlike an op's sub-ops."""
    def forward_only():
        model, x = torch.nn.Linear(32, 8), torch.randn(16, 32)
        while True:
            with torch.no_grad():
                model(x).square().mean()
            yield 1
    steps, plain = _linear_sgd(), forward_only()
    next(steps), next(plain)
    trained = profile_steps(steps, 3, torch.device("cpu"))
    forward = profile_steps(plain, 3, torch.device("cpu"))
    assert trained["kernels_per_step"] >= forward["kernels_per_step"] + 3  # grads of W, b and x-side ops, SGD's adds
