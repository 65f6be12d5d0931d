"""``train.cuda_graph`` (issue 14): the training step captured whole as one CUDA graph trains the run the eager step
trains.

On the CPU the graph itself cannot exist, so ``ReplayByRerun`` stands in for it with the same contract: capture
records without running, each replay runs the step on the graph's own input tensors and refreshes the outputs the
capture returned. That checks everything around the graph: warm-up, the copy of each batch into the graph's inputs,
the eager partial batch, the generators handed over for registration, and the learning rate on the device. The
tests marked for CUDA replay real graphs (``pytest -m cuda``; gpu-check runs them).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from paper_repro import config, step_graph, train as train_mod, train_stacked as stacked_mod
from paper_repro.train_stacked import train_stacked

from test_train_stacked import RUNS, assert_close_runs, settings_for, weight_drift

GRAPHED = {"batch_size": 25}  # 120 training images: 2 warm-up steps, 2 replays, the last 20 images eagerly


def _copy_into(target: Any, source: Any) -> None:
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    else:
        for t, s in zip(target, source, strict=True):
            _copy_into(t, s)


def _empty_like(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value)
    return type(value)(_empty_like(v) for v in value)


class ReplayByRerun(step_graph.StepGraph):
    """A CPU stand-in for a CUDA graph (see the module docstring); records what each capture registered."""

    captures: list[list[torch.Generator]] = []
    made: list["ReplayByRerun"] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made.append(self)
        self._template: Any = None

    def _warm_up(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        self._template = self.step(x, y)
        return self._template

    def _capture(self, run):
        self.captures.append(list(self.generators()))
        outputs = _empty_like(self._template)

        def replay() -> None:
            _copy_into(outputs, run())
        return replay, outputs


@pytest.fixture
def fake_graphs(monkeypatch):
    """Train and train-stacked graph their steps on the CPU with ReplayByRerun."""
    ReplayByRerun.captures, ReplayByRerun.made = [], []
    for module in (train_mod, stacked_mod):
        monkeypatch.setattr(module, "StepGraph", ReplayByRerun)
        monkeypatch.setattr(module, "use_cuda_graph", lambda settings, device: settings.train.cuda_graph)
    return ReplayByRerun


def test_a_graphed_run_is_the_eager_run(tmp_path, prepared_dir, float64, fake_graphs):
    """Weights, Q(W), histories and selection equal the eager run's; every epoch captured once, with the attack's
    and the noise's generators, replayed every full batch after warm-up, the partial batch run eagerly."""
    for schedule in ("step", "onecycle"):  # one-cycle moves the learning rate at every step
        eager_settings = settings_for(prepared_dir, schedule=schedule, **GRAPHED)
        graphed_settings = settings_for(prepared_dir, schedule=schedule, cuda_graph=True, **GRAPHED)
        for name in ("en1resnet8-ternary-br-pgd_at", "resnet8-fp-pgd_at"):
            e = eager_settings.experiment(name)
            fake_graphs.captures, fake_graphs.made = [], []
            a = train_mod.train(eager_settings, e, tmp_path / schedule / "eager" / name, quiet=True,
                                live_dir=tmp_path / "live" / schedule / "eager" / name)
            assert fake_graphs.made == []
            b = train_mod.train(graphed_settings, e, tmp_path / schedule / "graphed" / name, quiet=True,
                                live_dir=tmp_path / "live" / schedule / "graphed" / name)
            assert_close_runs(tmp_path / schedule / "eager" / name, tmp_path / schedule / "graphed" / name, a, b)
            assert [(g.eager_steps, g.replays) for g in fake_graphs.made] == [(3, 2), (3, 2)]  # per epoch
            assert [h["graph_replays"] for h in b["history"]] == [2, 2] and "graph_replays" not in a["history"][0]
            noisy = 1 if name.startswith("en1") else 0
            assert [len(gens) for gens in fake_graphs.captures] == [1 + noisy] * 2


def test_a_graphed_stacked_run_is_the_eager_stacked_run(tmp_path, prepared_dir, float64, fake_graphs):
    eager_settings = settings_for(prepared_dir, **GRAPHED)
    graphed_settings = settings_for(prepared_dir, cuda_graph=True, **GRAPHED)
    experiments = [eager_settings.experiment(r["name"]) for r in RUNS]
    a = train_stacked(eager_settings, experiments, [tmp_path / "eager" / e.name for e in experiments], quiet=True,
                      live_dirs=[tmp_path / "live-eager" / e.name for e in experiments])
    b = train_stacked(graphed_settings, experiments, [tmp_path / "graphed" / e.name for e in experiments],
                      quiet=True, live_dirs=[tmp_path / "live-graphed" / e.name for e in experiments])
    for e, sa, sb in zip(experiments, a, b):
        assert_close_runs(tmp_path / "eager" / e.name, tmp_path / "graphed" / e.name, sa, sb)
    assert [(g.eager_steps, g.replays) for g in fake_graphs.made] == [(3, 2), (3, 2)]
    # three attack generators; noise: en1resnet8 one member, en2resnet8 two
    assert [len(gens) for gens in fake_graphs.captures] == [3 + 3] * 2


def test_a_failed_capture_is_reported_and_the_epoch_runs_eagerly(tmp_path, prepared_dir, float64, fake_graphs,
                                                                  monkeypatch, capsys):
    def refuse(self, run):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(ReplayByRerun, "_capture", refuse)
    e = "en1resnet8-ternary-br-pgd_at"
    eager_settings, graphed_settings = settings_for(prepared_dir, **GRAPHED), settings_for(prepared_dir, cuda_graph=True,
                                                                                         **GRAPHED)
    a = train_mod.train(eager_settings, eager_settings.experiment(e), tmp_path / "a", quiet=True, live_dir=tmp_path / "la")
    b = train_mod.train(graphed_settings, graphed_settings.experiment(e), tmp_path / "b", quiet=True,
                        live_dir=tmp_path / "lb")
    assert_close_runs(tmp_path / "a", tmp_path / "b", a, b)
    assert [(g.eager_steps, g.replays) for g in fake_graphs.made] == [(5, 0), (5, 0)]
    assert b["history"][0]["graph_failure"] == "RuntimeError: operation not permitted when stream is capturing"
    assert "the CUDA graph capture of the training step failed" in capsys.readouterr().err


def test_a_restored_momentum_buffer_is_laid_out_as_its_parameter(tmp_path):
    """CUDA's fused SGD requires a parameter, its gradient and its momentum to share strides; a saved buffer comes
    back contiguous, the conv weights are channels_last."""
    from paper_repro import run_state
    from paper_repro.models import build
    settings = config.from_dict({})
    e = config.Experiment(name="m", model="en1resnet8", quantizer="ternary")
    net = build("en1resnet8", seed=0).to(memory_format=torch.channels_last)
    opt = train_mod.make_optimizer(net.parameters(), settings, lr_on_device=True)
    for p in net.parameters():
        opt.state[p]["momentum_buffer"] = torch.randn_like(p)  # channels_last like p
    paths = train_mod.RunPaths(tmp_path)
    run_state.save_state(paths, net, opt, train_mod.make_relax(net, e, settings), {"epochs_done": 1})
    again = train_mod.make_optimizer(net.parameters(), settings, lr_on_device=True)
    run_state.load_state(paths, net, again, train_mod.make_relax(net, e, settings), torch.device("cpu"))
    convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1]  # a 1x1 conv is both layouts
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    for p in net.parameters():
        buf = again.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride() and torch.equal(buf, opt.state[p]["momentum_buffer"])


def test_the_learning_rate_a_graph_reads_is_set_in_place():
    """A graph keeps reading the tensor it captured: the schedule must refill it, never replace it."""
    settings = config.from_dict({"train": {"lr": 0.1, "momentum": 0.9}})
    model = torch.nn.Linear(3, 2)
    opt = train_mod.make_optimizer(model.parameters(), settings, lr_on_device=True)
    held = opt.param_groups[0]["lr"]
    assert isinstance(held, torch.Tensor) and opt.defaults["fused"]
    train_mod.set_lr(opt, 0.0123)
    assert opt.param_groups[0]["lr"] is held and float(held) == pytest.approx(0.0123)
    assert train_mod.current_lr(opt) == 0.0123  # the schedule's value, not its fp32 rounding
    plain = train_mod.make_optimizer(model.parameters(), settings)
    train_mod.set_lr(plain, 0.5)
    assert plain.param_groups[0]["lr"] == 0.5 and train_mod.current_lr(plain) == 0.5


def test_cuda_graph_settings_are_checked_and_noted_off_cuda(tmp_path, prepared_dir, capsys):
    with pytest.raises(config.ConfigError, match="cuda_graph .* train.compile reduce-overhead"):
        config.from_dict({"train": {"cuda_graph": True, "compile": "reduce-overhead"}})
    config.from_dict({"train": {"cuda_graph": True, "compile": "default"}})
    settings = settings_for(prepared_dir, cuda_graph=True, epochs=1, milestones=[], relax={"hard_epoch": 0},
                            device="cpu")
    e = settings.experiment("resnet8-fp-pgd_at")
    summary = train_mod.train(settings, e, tmp_path / "run", quiet=True, live_dir=tmp_path / "live")
    assert len(summary["history"]) == 1
    assert "train.cuda_graph needs a CUDA device" in capsys.readouterr().out


def test_a_warm_up_of_zero_steps_is_refused():
    with pytest.raises(ValueError, match="warm-up"):
        step_graph.StepGraph(lambda x, y: x, lambda: [], warmup=0)


# --------------------------------------------------------------------------- on a GPU: real graphs
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("schedule", ["step", "onecycle"])
def test_a_cuda_graphed_run_follows_the_eager_run(tmp_path, prepared_dir, schedule):
    """Real capture and replay (fp32, deterministic cuDNN, TF32 off): the graphed runs of a noisy ternary BR model
    and of a stacked pair follow the eager ones, which use the same fused SGD (a stale batch, a baked learning rate
    or an unregistered generator would move them far apart), and every full batch after warm-up was a replay."""
    made: list[step_graph.StepGraph] = []

    class Counted(step_graph.StepGraph):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    with torch.backends.cudnn.flags(enabled=True, deterministic=True, benchmark=False, allow_tf32=False), \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "StepGraph", Counted)
        mp.setattr(stacked_mod, "StepGraph", Counted)
        mp.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        # train sets torch.backends.cudnn.benchmark from its settings: off here, as the flags above say
        common = {"schedule": schedule, "device": "cuda", "amp": "off", "cudnn_benchmark": False, **GRAPHED}
        eager, graphed = settings_for(prepared_dir, **common), settings_for(prepared_dir, cuda_graph=True, **common)
        e = eager.experiment("en1resnet8-ternary-br-pgd_at")
        a = train_mod.train(eager, e, tmp_path / "eager", quiet=True, live_dir=tmp_path / "le")
        b = train_mod.train(graphed, e, tmp_path / "graphed", quiet=True, live_dir=tmp_path / "lg")
        assert [(g.eager_steps, g.replays, g.failure) for g in made] == [(3, 2, None), (3, 2, None)]
        _assert_follows(tmp_path / "eager", tmp_path / "graphed", a, b)
        pair = [eager.experiment(r["name"]) for r in RUNS[:2]]
        sa = train_stacked(eager, pair, [tmp_path / "se" / x.name for x in pair], quiet=True,
                           live_dirs=[tmp_path / "lse" / x.name for x in pair])
        sb = train_stacked(graphed, pair, [tmp_path / "sg" / x.name for x in pair], quiet=True,
                           live_dirs=[tmp_path / "lsg" / x.name for x in pair])
        for x, ra, rb in zip(pair, sa, sb):
            _assert_follows(tmp_path / "se" / x.name, tmp_path / "sg" / x.name, ra, rb)


def _assert_follows(a, b, summary_a, summary_b) -> None:
    drift, _ = weight_drift(a, b)
    assert drift < 1e-5, f"graphed weights drift {drift:.1e} (relative L2) from the eager run's"
    for ha, hb in zip(summary_a["history"], summary_b["history"], strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        assert ha["lr"] == hb["lr"] and hb["graph_replays"] == 2 and "graph_failure" not in hb


@needs_cuda
def test_a_cuda_graphed_run_in_bf16_resumes_graphed(tmp_path, prepared_dir):
    """The production path: bf16 autocast and channels_last, one graphed epoch, then --resume (momentum restored
    from the saved state, laid out as the channels_last weights that the fused SGD needs) for a graphed second."""
    _graphed_bf16_run_resumes_graphed(tmp_path, prepared_dir, "cuda")


def test_a_graphed_run_in_bf16_resumes_graphed(tmp_path, prepared_dir, fake_graphs):
    """The same flow on the CPU with the stand-in graph."""
    _graphed_bf16_run_resumes_graphed(tmp_path, prepared_dir, "cpu")


def _graphed_bf16_run_resumes_graphed(tmp_path, prepared_dir, device: str) -> None:
    common = {"device": device, "amp": "bf16", "cuda_graph": True, **GRAPHED}
    e = "en1resnet8-ternary-br-pgd_at"
    first = settings_for(prepared_dir, epochs=1, **common)  # the same trajectory: the step schedule ignores epochs
    train_mod.train(first, first.experiment(e), tmp_path / "run", quiet=True, live_dir=tmp_path / "live")
    both = settings_for(prepared_dir, **common)
    summary = train_mod.train(both, both.experiment(e), tmp_path / "run", resume=True, quiet=True,
                              live_dir=tmp_path / "live")
    assert [h["graph_replays"] for h in summary["history"]] == [2, 2]
    assert all("graph_failure" not in h and h["train_loss"] < 10 for h in summary["history"])


def test_bench_times_the_graphed_step_beside_ours_and_stacked(monkeypatch):
    """`bench --cuda-graph` adds a graphed loop to each row and a graphed stacked network, replayed after warm-up;
    the grid estimate keeps the eager stacked speedup."""
    from paper_repro import bench, gpu_report
    ReplayByRerun.made = []
    monkeypatch.setattr(bench, "StepGraph", ReplayByRerun)
    settings = config.from_dict({"train": {"pgd": {"steps": 2}}})
    results = bench.run(settings, ("resnet8",), ("pgd_at",), 8, 3, 1, 8 * 8, torch.device("cpu"), log=lambda _: None,
                        repeats=2, stacked=(2,), stacked_model="resnet8", graph=True)
    row, stacked = results["pgd_at_resnet8_graphed"], results["stacked2_pgd_at_resnet8_graphed"]
    assert set(row["stats"]) == {"baseline", "ours", "graphed"} and row["variant"] == "graphed" and row["graphed"] > 0
    assert set(stacked["stats"]) == {"sequential", "stacked", "stacked_graphed"} and stacked["speedup"] > 0
    assert [(g.eager_steps, g.replays) for g in ReplayByRerun.made] == [(2, 3), (2, 3)]  # 3 warm-up + 2 x 1 timed
    assert gpu_report.best_stacked({"results": results}) == (2, results["stacked2_pgd_at_resnet8"]["speedup"])


def test_bench_cuda_graph_needs_cuda(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "bench", "--cuda-graph", "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "bench --cuda-graph needs a CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_times_the_compiled_network_inside_the_graph(monkeypatch):
    """With --compile default and --cuda-graph, a fifth loop runs the compiled network inside the step's graph
    (torch.compile is replaced by the identity here: what is checked is which loops run and how they are named)."""
    from paper_repro import bench, gpu_report
    monkeypatch.setattr(bench, "StepGraph", ReplayByRerun)
    monkeypatch.setattr(bench.torch, "compile", lambda model, mode=None: model)
    settings = config.from_dict({"train": {"pgd": {"steps": 1}}})
    results = bench.run(settings, ("resnet8",), ("pgd_at",), 8, 3, 1, 8 * 8, torch.device("cpu"), log=lambda _: None,
                        compile_mode="default", graph=True)
    both = results["pgd_at_resnet8_compiled_graphed"]
    assert set(both["stats"]) == {"baseline", "ours", "compiled", "graphed", "compiled_graphed"}
    assert both["variant"] == "compiled_graphed" and both["compile_mode"] == "default"
    md = "\n".join(gpu_report._bench({"result": {"results": results}}))
    assert "pgd_at_resnet8_compiled_graphed (torch.compile default inside one CUDA graph of the step)" in md
    # reduce-overhead makes CUDA graphs itself: no combined loop
    assert "pgd_at_resnet8_compiled_graphed" not in bench.run(
        settings, ("resnet8",), ("pgd_at",), 8, 3, 1, 8 * 8, torch.device("cpu"), log=lambda _: None,
        compile_mode="reduce-overhead", graph=True)


def test_a_failing_bench_row_spares_the_others(tmp_path, monkeypatch):
    """On the CPU a real CUDA graph cannot be made: that row fails, is reported, and the next row is measured."""
    from paper_repro import gpu_parts
    monkeypatch.setattr(gpu_parts, "DRY_BENCH_PLAN", (("resnet8", "pgd_at", None, True, None),
                                                      ("resnet8", "pgd_at", None, False, 2)))
    part = gpu_parts.Part("bench", tmp_path, True, 120.0, gpu_parts.GPU_PARAMS)
    with pytest.raises(RuntimeError, match="1 bench row"):
        gpu_parts.part_bench(part)
    assert list(part.result["results"]) == ["stacked2_pgd_at_resnet8"]
    assert part.result["failed_rows"][0]["row"] == "pgd_at resnet8, compile None, cuda graph True"


def test_a_later_bench_entry_adds_its_loops_profiles_to_the_kept_row(tmp_path, monkeypatch):
    """The compile-in-graph entry re-times the first entry's row: its compiled loop's profile must still reach the
    report (torch.compile is the identity here: what is checked is where the profiles go)."""
    from paper_repro import bench, gpu_parts
    monkeypatch.setattr(bench.torch, "compile", lambda model, mode=None: model)
    monkeypatch.setattr(gpu_parts, "DRY_BENCH_PLAN", (("resnet8", "pgd_at", None, False, None),
                                                      ("resnet8", "pgd_at", "default", False, None)))
    part = gpu_parts.Part("bench", tmp_path, True, 120.0, gpu_parts.GPU_PARAMS)
    gpu_parts.part_bench(part)
    row = part.result["results"]["pgd_at_resnet8"]
    assert set(row["stats"]) == {"baseline", "ours"}  # the first measurement is kept
    assert set(row["profile"]) == {"baseline", "ours", "compiled"}
    assert part.result["results"]["pgd_at_resnet8_compiled"]["variant"] == "compiled"


# --------------------------------------------------------------------------- capture safety, checked on the CPU
class HostSyncSpy(TorchFunctionMode):
    """Records the calls that a CUDA graph capture cannot hold: reading a device value on the host (item, bool, ...),
    copying host data to the device (torch.tensor), and ops whose output size depends on device values."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "tensor",
             "as_tensor", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        sized_by_values = (name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor)
                           and "output_size" not in kwargs)
        masked = name == "__getitem__" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in self.READS or sized_by_values or masked:
            self.found.append(name)
        return func(*args, **kwargs)


def _one_step_then_spy(step, x, y) -> list[str]:
    step(x, y)  # the warm-up a capture follows: buffers, momentum and generators exist afterwards
    with HostSyncSpy() as spy:
        step(x, y)
    return spy.found


@pytest.mark.parametrize("model, quantizer, method, loss, amp", [
    ("en1resnet8", "ternary", "BR", "pgd_at", False), ("en1resnet8", "ternary", "BR", "pgd_at", True),
    ("en2resnet8", "4bit", "BR", "tradeoff", False), ("resnet8", "binary", "BC", "natural", False)])
def test_a_training_step_never_waits_for_the_device(model, quantizer, method, loss, amp):
    """What train.cuda_graph captures (attack, BR swap, loss, backward, fused SGD with the lr on the device) calls
    nothing that syncs with the host; on a GPU any such call fails the capture."""
    from paper_repro.losses import objective_for
    from paper_repro.models import build
    settings = config.from_dict({"train": {"pgd": {"steps": 2}, "relax": {"hard_epoch": 1}}})
    e = config.Experiment(name="m", model=model, quantizer=quantizer, method=method, loss=loss)
    net = build(model, seed=0).to(memory_format=torch.channels_last)
    relax = train_mod.make_relax(net, e, settings)
    opt = train_mod.make_optimizer(net.parameters(), settings, lr_on_device=True)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.arange(4)

    def step(x, y):
        return train_mod.train_step(net, relax, objective_for(e, settings.train.pgd), opt, x, y, gen, amp)

    assert _one_step_then_spy(step, x, y) == []


def test_a_stacked_training_step_never_waits_for_the_device():
    from paper_repro.losses import objective_for
    from paper_repro.models import build
    from paper_repro.stacked import stack_models
    from paper_repro.stacked_step import StackedRelax, stacked_train_step
    settings = config.from_dict({"train": {"pgd": {"steps": 2}}})
    names = [("resnet8", "none"), ("en1resnet8", "ternary"), ("en2resnet8", "binary")]
    experiments = [config.Experiment(name=f"m{i}", model=m, quantizer=q, loss="pgd_at") for i, (m, q) in
                   enumerate(names)]
    models = [build(m, seed=i) for i, (m, _) in enumerate(names)]
    net = stack_models(models).to(memory_format=torch.channels_last)
    relax = StackedRelax(net, [train_mod.make_relax(build(m, seed=i), e, settings)
                               for i, ((m, _), e) in enumerate(zip(names, experiments))])
    opt = train_mod.make_optimizer(net.parameters(), settings, lr_on_device=True)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    objectives = [objective_for(e, settings.train.pgd) for e in experiments]
    x, y = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last), torch.arange(4)
    assert _one_step_then_spy(lambda x, y: stacked_train_step(net, relax, objectives, opt, x, y, gens, False),
                              x, y) == []


def test_the_spy_sees_host_syncs():
    with HostSyncSpy() as spy:
        v = torch.arange(3.0)
        v.sum().item()
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]))
        _ = v[v > 0]
    assert spy.found == ["item", "tensor", "repeat_interleave", "__getitem__"]
