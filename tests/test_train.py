"""Training: tiny runs of each kind complete; resume repeats an uninterrupted run; failures are clean."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from paper_repro import checkpoint, config, train as train_mod
from paper_repro.quant import levels

TINY_TRAIN = {"epochs": 2, "batch_size": 50, "milestones": [1], "relax": {"hard_epoch": 1},
              "pgd": {"steps": 2}, "val_attack": {"steps": 2}, "val_examples": 20}
EXPERIMENTS = [
    {"name": "resnet20-fp-natural", "model": "resnet20", "loss": "natural"},
    {"name": "resnet20-fp-pgd_at", "model": "resnet20", "loss": "pgd_at"},
    {"name": "en1resnet20-ternary-br-tradeoff", "model": "en1resnet20", "quantizer": "ternary",
     "method": "BR", "loss": "tradeoff"},
    {"name": "en1resnet20-binary-bc-pgd_at", "model": "en1resnet20", "quantizer": "binary",
     "method": "BC", "loss": "pgd_at"},
    {"name": "resnet20-4bit-br-trades", "model": "resnet20", "quantizer": "4bit", "loss": "trades"},
]


SMALL = "resnet8-fp-natural"  # the cheapest run, for tests of the run folder rather than of the training


def settings_for(prepared_dir, **train_overrides) -> config.Settings:
    return config.from_dict({"profile": "test", "data": {"prepared": str(prepared_dir), "expect_counts": None,
                                                         "val_size": 30},
                             "train": {**TINY_TRAIN, **train_overrides},
                             "experiments": [*EXPERIMENTS, {"name": SMALL, "model": "resnet8", "loss": "natural"}]})


def assert_same_checkpoints(run_a, run_b, which=("state", "deployed", "float_weights")) -> None:
    for attr in which:
        a, _ = checkpoint.load(getattr(train_mod.RunPaths(run_a), attr))
        b, _ = checkpoint.load(getattr(train_mod.RunPaths(run_b), attr))
        assert sorted(a) == sorted(b), attr
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{attr}: {len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize("name", [e["name"] for e in EXPERIMENTS])
def test_tiny_runs_complete_and_deploy_quantized_weights(tmp_path, prepared_dir, name):
    settings = settings_for(prepared_dir)
    exp = settings.experiment(name)
    summary = train_mod.train(settings, exp, tmp_path / name, quiet=True, live_dir=tmp_path / "live")
    paths = train_mod.RunPaths(tmp_path / name)
    assert len(summary["history"]) == 2 and summary["selected"]["epoch"] >= 1
    deployed, side = checkpoint.load(paths.deployed)
    assert side["arch"] == exp.model and side["data"]["official"] is False
    assert side["amp_in_effect"] is False and summary["amp_in_effect"] is False  # amp auto on a CPU: fp32
    if exp.quantized:
        assert side["quantized"] and summary["selected"]["phase"] == 2  # selection among phase-2 epochs only
        for tensor_name in side["quantized"]:
            distinct = torch.unique(deployed[tensor_name])
            nonzero = distinct[distinct != 0]
            assert len(distinct) <= levels(exp.quantizer) and len(nonzero) <= {"binary": 2, "ternary": 2,
                                                                              "4bit": 14}[exp.quantizer]
    else:
        assert side["quantized"] == []
        float_w, _ = checkpoint.load(paths.float_weights)
        assert all(torch.equal(float_w[k], deployed[k]) for k in float_w)
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert {"train_loss", "val_pgd_acc", "eta"} <= set(metrics)


@pytest.mark.parametrize("amp, device, in_effect", [
    ("auto", "cuda", True), ("auto", "cpu", False), ("bf16", "cpu", True), ("off", "cuda", False)])
def test_the_run_records_the_autocast_in_effect(tmp_path, monkeypatch, amp, device, in_effect):
    """The sidecar (hence train.json, and train-stacked's runs: the same run_sidecar) records whether bf16 autocast
    ran, next to the configured train.amp: amp "auto" (the paper profile's) is bf16 on CUDA, fp32 on a CPU."""
    monkeypatch.setattr(train_mod, "device_name", lambda d: f"{d.type} (stand-in name)")  # no CUDA needed
    settings = config.from_dict({"profile": "test", "train": {"amp": amp},
                                 "experiments": [{"name": SMALL, "model": "resnet8", "loss": "natural"}]})
    exp = settings.experiment(SMALL)
    model = train_mod.make_model(exp, 0, torch.device("cpu"), False)
    side = train_mod.run_sidecar(settings, exp, model, train_mod.make_relax(model, exp, settings), {},
                                 torch.device(device))
    assert side["amp_in_effect"] is in_effect and side["train"]["amp"] == amp


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, prepared_dir, monkeypatch):
    settings = settings_for(prepared_dir)
    exp = settings.experiment("en1resnet20-ternary-br-tradeoff")
    train_mod.train(settings, exp, tmp_path / "straight", quiet=True, live_dir=tmp_path / "l1")

    real_epoch = train_mod.train_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 1:  # the second epoch
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(settings, exp, tmp_path / "resumed", quiet=True, live_dir=tmp_path / "l2")
    state, record = checkpoint.load(train_mod.RunPaths(tmp_path / "resumed").state)  # loadable after interrupt
    assert record["epochs_done"] == 1
    monkeypatch.setattr(train_mod, "train_epoch", real_epoch)
    train_mod.train(settings, exp, tmp_path / "resumed", resume=True, quiet=True, live_dir=tmp_path / "l2")
    assert len((tmp_path / "l2" / "plots" / "metrics" / "val_pgd_acc.tsv").read_text().splitlines()) == 3  # header + 2

    for which in ("state", "deployed", "float_weights"):
        a, _ = checkpoint.load(getattr(train_mod.RunPaths(tmp_path / "straight"), which))
        b, _ = checkpoint.load(getattr(train_mod.RunPaths(tmp_path / "resumed"), which))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), which


def test_resume_with_changed_settings_stops_unless_restart(tmp_path, prepared_dir, capsys):
    """Issue 17.1: a setting that changes the training stops --resume (progress kept, differences named);
    --restart discards the state and starts again, saying why."""
    settings = settings_for(prepared_dir, epochs=1, milestones=[], relax={"hard_epoch": 0})
    exp = settings.experiment(SMALL)
    train_mod.train(settings, exp, tmp_path / "run", quiet=True, live_dir=tmp_path / "l")
    state = train_mod.RunPaths(tmp_path / "run").state
    before = state.read_bytes()
    changed = settings_for(prepared_dir, epochs=1, milestones=[], relax={"hard_epoch": 0}, lr=0.05)
    with pytest.raises(train_mod.SettingsChanged, match=r"train\.lr: 0\.1 -> 0\.05.*--restart"):
        train_mod.train(changed, exp, tmp_path / "run", resume=True, quiet=True, live_dir=tmp_path / "l")
    assert state.read_bytes() == before and train_mod.RunPaths(tmp_path / "run").summary.is_file()
    capsys.readouterr()
    summary = train_mod.train(changed, exp, tmp_path / "run", resume=True, restart=True, quiet=True,
                              live_dir=tmp_path / "l")
    out = capsys.readouterr().out
    assert "train.lr: 0.1 -> 0.05" in out and "discarding its 1 finished epoch" in out
    assert summary["train"]["lr"] == 0.05 and len(summary["history"]) == 1


def test_resume_ignores_execution_settings_and_extends_epochs(tmp_path, prepared_dir, capsys):
    """Issue 17.1: device, amp (not in effect on CPU), channels_last and compile do not stop a resume, and a
    step-schedule run extended from 1 to 2 epochs equals a 2-epoch run trained straight."""
    base = dict(milestones=[1], relax={"hard_epoch": 0})
    straight = settings_for(prepared_dir, epochs=2, **base)
    train_mod.train(straight, straight.experiment(SMALL), tmp_path / "straight", quiet=True, live_dir=tmp_path / "l1")
    short = settings_for(prepared_dir, epochs=1, device="auto", amp="auto", **base)
    train_mod.train(short, short.experiment(SMALL), tmp_path / "run", quiet=True, live_dir=tmp_path / "l2")
    capsys.readouterr()
    longer = settings_for(prepared_dir, epochs=2, device="cpu", amp="off", **base)
    train_mod.train(longer, longer.experiment(SMALL), tmp_path / "run", resume=True, quiet=True,
                    live_dir=tmp_path / "l2")
    out = capsys.readouterr().out
    assert f"resuming {SMALL} after epoch 1" in out
    assert "train.epochs 1 -> 2" in out and "milestones [1] are absolute epochs" in out
    assert "execution settings differ" in out and "train.amp: 'auto' -> 'off'" in out
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "run")
    # channels_last changes only the memory layout (floating-point rounding), never the trajectory
    layout = settings_for(prepared_dir, epochs=2, channels_last=False, **base)
    train_mod.train(layout, layout.experiment(SMALL), tmp_path / "run", resume=True, quiet=True,
                    live_dir=tmp_path / "l2")
    assert "train.channels_last: True -> False" in capsys.readouterr().out


def test_compiled_training_follows_the_eager_one(tmp_path, prepared_dir):
    """train.compile (issue 14): the network under torch.compile trains the same run as eager (within float
    tolerance: the compiler fuses and reorders), through the EnResNet noise, the attack, BinaryRelax's weight
    swaps and the validation; the saved keys are the module's. A resume may switch compile (execution setting)."""
    name = "en1resnet8-ternary-br-pgd_at"
    extra = [{"name": name, "model": "en1resnet8", "quantizer": "ternary", "loss": "pgd_at"}]
    runs = {}
    for mode in ("none", "default"):
        settings = config.from_dict({"profile": "test", "data": {"prepared": str(prepared_dir), "expect_counts": None,
                                                                 "val_size": 30},
                                     "train": {**TINY_TRAIN, "epochs": 1, "relax": {"hard_epoch": 0}, "compile": mode},
                                     "experiments": extra})
        runs[mode] = train_mod.train(settings, settings.experiment(name), tmp_path / mode, quiet=True,
                                     live_dir=tmp_path / f"live-{mode}")
    eager, _ = checkpoint.load(train_mod.RunPaths(tmp_path / "none").float_weights)
    compiled, side = checkpoint.load(train_mod.RunPaths(tmp_path / "default").float_weights)
    assert sorted(eager) == sorted(compiled) and not any("_orig_mod" in k for k in compiled)
    keys = [k for k in eager if eager[k].is_floating_point()]
    delta = torch.cat([(eager[k].float() - compiled[k].float()).flatten() for k in keys])
    drift = float(delta.norm() / torch.cat([eager[k].float().flatten() for k in keys]).norm())
    assert drift < 2e-3, f"the compiled run's weights differ from eager by {drift:.2%} (relative L2 over all tensors)"
    assert side["train"]["compile"] == "default"
    a, b = runs["none"]["history"][0], runs["default"]["history"][0]
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["val_natural_acc"] - b["val_natural_acc"]) <= 100 / 30


def test_extending_a_one_cycle_run_is_refused(tmp_path, prepared_dir):
    """Issue 17.1: the one-cycle learning rate depends on train.epochs, so more epochs is another run."""
    settings = settings_for(prepared_dir, epochs=1, schedule="onecycle", milestones=[], relax={"hard_epoch": 0})
    exp = settings.experiment(SMALL)
    train_mod.train(settings, exp, tmp_path / "run", quiet=True, live_dir=tmp_path / "l")
    longer = settings_for(prepared_dir, epochs=2, schedule="onecycle", milestones=[], relax={"hard_epoch": 0})
    with pytest.raises(train_mod.SettingsChanged, match=r"train\.epochs: 1 -> 2.*one-cycle.*--restart"):
        train_mod.train(longer, exp, tmp_path / "run", resume=True, quiet=True, live_dir=tmp_path / "l")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, prepared_dir, monkeypatch):
    settings = settings_for(prepared_dir)
    exp = settings.experiment("resnet20-fp-pgd_at")
    real_loss = train_mod.Objective.loss
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        value, logits = real_loss(self, *args)
        return (value * float("nan"), logits) if calls["n"] > 3 else (value, logits)  # epoch 1 has 3 batches

    monkeypatch.setattr(train_mod.Objective, "loss", poisoned)
    with pytest.raises(train_mod.TrainingDiverged, match="non-finite loss at epoch 2.*end of epoch 1"):
        train_mod.train(settings, exp, tmp_path / "run", quiet=True, live_dir=tmp_path / "l")
    _, record = checkpoint.load(train_mod.RunPaths(tmp_path / "run").state)
    assert record["epochs_done"] == 1


def test_non_finite_batchnorm_statistics_are_divergence(tmp_path, prepared_dir, monkeypatch):
    """Issue 17.3: a finite loss with infinite BatchNorm statistics is caught before anything is saved, and
    the message names the epoch really kept on disk."""
    settings = settings_for(prepared_dir, milestones=[], relax={"hard_epoch": 0})
    exp = settings.experiment(SMALL)
    real_epoch = train_mod.train_epoch

    def poisoned(model, *args, **kwargs):
        stats = real_epoch(model, *args, **kwargs)
        if args[4] == 1:  # the second epoch: the loss was finite, the statistics are not
            next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("inf"))
        return stats

    monkeypatch.setattr(train_mod, "train_epoch", poisoned)
    with pytest.raises(train_mod.TrainingDiverged, match=r"non-finite model\..*running_var after epoch 2.*"
                                                        r"end of epoch 1"):
        train_mod.train(settings, exp, tmp_path / "run", quiet=True, live_dir=tmp_path / "l")
    paths = train_mod.RunPaths(tmp_path / "run")
    for which in (paths.state, paths.deployed, paths.float_weights):
        tensors, record = checkpoint.load(which)
        assert not train_mod.non_finite(tensors), which
    assert checkpoint.read_sidecar(paths.state)["epochs_done"] == 1
    assert checkpoint.read_sidecar(paths.deployed)["selected"]["epoch"] == 1


def test_divergence_in_the_first_epoch_says_nothing_is_saved(tmp_path, prepared_dir):
    """Issue 17.3: lr=1e6 used to exit 0 with infinite BatchNorm statistics saved."""
    settings = settings_for(prepared_dir, epochs=1, milestones=[], relax={"hard_epoch": 0}, lr=1e6)
    exp = settings.experiment(SMALL)
    with pytest.raises(train_mod.TrainingDiverged, match="nothing is saved"):
        train_mod.train(settings, exp, tmp_path / "run", quiet=True, live_dir=tmp_path / "l")
    paths = train_mod.RunPaths(tmp_path / "run")
    assert not paths.state.exists() and not paths.deployed.exists() and paths.incomplete.is_file()


@pytest.mark.parametrize("override, message", [
    ("train.epochs=-1", "train.epochs must be >= 1"),
    ("train.relax.hard_epoch=500", "train.relax.hard_epoch (500) must be <= train.epochs"),
    ("train.pgd.eps=3", "train.pgd.eps must be in (0, 1]"),
    ("experiments={x: {model: resnet21}}", "experiments.x.model: unknown model 'resnet21'"),
    ("train.batchsize=3", "unknown key train.batchsize"),
])
def test_bad_settings_fail_at_load_with_one_line(tmp_path, override, message):
    params = tmp_path / "params.yaml"
    params.write_text("experiments: {a: {model: resnet20}}\n")
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "train", "--params", str(params), "-e", "a",
                           "--set", override], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr


def test_unknown_experiment_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("experiments: {a: {model: resnet20}}\n")
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "train", "--params", str(params), "-e", "b"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown experiment 'b'; params.yaml lists: a" in proc.stderr


def test_learning_rate_schedule_follows_milestones():
    s = config.from_dict({"train": {"milestones": [80, 120, 160]}})
    assert [round(train_mod.lr_at(e, s), 6) for e in (0, 79, 80, 119, 120, 160, 199)] == \
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001]


def test_resuming_a_finished_run_restores_a_missing_training_log(tmp_path, prepared_dir):
    settings = settings_for(prepared_dir, epochs=1, milestones=[], relax={"hard_epoch": 0})
    exp = settings.experiment("resnet20-fp-natural")
    train_mod.train(settings, exp, tmp_path / "run", quiet=True, live_dir=tmp_path / "live")
    before = (tmp_path / "live" / "plots" / "metrics" / "train_loss.tsv").read_text()
    import shutil
    shutil.rmtree(tmp_path / "live")
    train_mod.train(settings, exp, tmp_path / "run", resume=True, quiet=True, live_dir=tmp_path / "live")
    assert (tmp_path / "live" / "plots" / "metrics" / "train_loss.tsv").read_text() == before


def test_bench_rejects_unknown_models_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "bench", "--params", str(tmp_path / "none.yaml"),
                           "--models", "resnet99"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unknown model 'resnet99'" in proc.stderr
