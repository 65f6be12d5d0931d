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


def settings_for(prepared_dir, **train_overrides) -> config.Settings:
    return config.from_dict({"profile": "test", "data": {"prepared": str(prepared_dir), "expect_counts": None,
                                                         "val_size": 30},
                             "train": {**TINY_TRAIN, **train_overrides}, "experiments": EXPERIMENTS})


@pytest.mark.parametrize("name", [e["name"] for e in EXPERIMENTS])
def test_tiny_runs_complete_and_deploy_quantized_weights(tmp_path, prepared_dir, name):
    settings = settings_for(prepared_dir)
    exp = settings.experiment(name)
    summary = train_mod.train(settings, exp, tmp_path / name, quiet=True, live_dir=tmp_path / "live")
    paths = train_mod.RunPaths(tmp_path / name)
    assert len(summary["history"]) == 2 and summary["selected"]["epoch"] >= 1
    deployed, side = checkpoint.load(paths.deployed)
    assert side["arch"] == exp.model and side["data"]["official"] is False
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


def test_resume_with_changed_settings_starts_again(tmp_path, prepared_dir, capsys):
    settings = settings_for(prepared_dir, epochs=1, milestones=[], relax={"hard_epoch": 0})
    exp = settings.experiment("resnet20-fp-natural")
    train_mod.train(settings, exp, tmp_path / "run", quiet=True, live_dir=tmp_path / "l")
    changed = settings_for(prepared_dir, epochs=1, milestones=[], relax={"hard_epoch": 0}, lr=0.05)
    train_mod.train(changed, exp, tmp_path / "run", resume=True, quiet=True, live_dir=tmp_path / "l")
    assert "starting from scratch" in capsys.readouterr().out


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
    with pytest.raises(train_mod.TrainingDiverged, match="non-finite loss at epoch 2"):
        train_mod.train(settings, exp, tmp_path / "run", quiet=True, live_dir=tmp_path / "l")
    _, record = checkpoint.load(train_mod.RunPaths(tmp_path / "run").state)
    assert record["epochs_done"] == 1


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
