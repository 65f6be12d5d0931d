"""`train-stacked` (issue 14): K runs trained as one stacked network are the runs `train` makes one by one, and their
states are plain `train` states.

The comparisons train in float64 (the loader and the models follow torch's default dtype): in fp32 a grouped
convolution sums in another order than the member's own, and a few SGD steps on 120 images grow that rounding
(1e-7) to 1e-4..1e-3 of the weights (the gradient sums of the stem and of the noise's std(out) cancel heavily),
which would hide a real mismatch. In float64 a stacked run equals the separate runs to 1e-7 (the weights are saved
in fp32, the noise's std is taken in fp32) through PGD-AT, the EnResNet noise, BinaryRelax, BinaryConnect,
checkpoint selection and resume.
"""
from __future__ import annotations

import json

import pytest
import torch

from paper_repro import checkpoint, cli, config, train as train_mod
from paper_repro.stacking import stacks
from paper_repro.train_stacked import train_stacked

TINY = {"epochs": 2, "batch_size": 50, "milestones": [1], "relax": {"hard_epoch": 1}, "pgd": {"steps": 2},
        "val_attack": {"steps": 2}, "val_examples": 20}
RUNS = [  # one ResNet8 depth: a plain float model, a noisy ternary BR ensemble of one, a noisy two-member BC ensemble
    {"name": "resnet8-fp-pgd_at", "model": "resnet8", "loss": "pgd_at"},
    {"name": "en1resnet8-ternary-br-pgd_at", "model": "en1resnet8", "quantizer": "ternary", "loss": "pgd_at"},
    {"name": "en2resnet8-binary-bc-pgd_at", "model": "en2resnet8", "quantizer": "binary", "method": "BC",
     "loss": "pgd_at"},
]
OTHERS = [{"name": "resnet8-fp-natural", "model": "resnet8", "loss": "natural"},
          {"name": "resnet14-fp-pgd_at", "model": "resnet14", "loss": "pgd_at"},
          {"name": "wrn10-1-fp-pgd_at", "model": "wrn10-1", "loss": "pgd_at"},
          {"name": "resnet8-fp-trades", "model": "resnet8", "loss": "trades"}]


def settings_for(prepared_dir, **train) -> config.Settings:
    return config.from_dict({"profile": "test", "data": {"prepared": str(prepared_dir), "expect_counts": None,
                                                         "val_size": 30},
                             "train": {**TINY, **train}, "experiments": [*RUNS, *OTHERS]})


def weights(run_dir, which="float_weights"):
    return checkpoint.load(getattr(train_mod.RunPaths(run_dir), which))[0]


def weight_drift(a, b) -> tuple[float, float]:
    """(relative L2, largest absolute) difference of two run folders' float weights."""
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    keys = [k for k in wa if wa[k].is_floating_point()]
    delta = torch.cat([(wa[k].float() - wb[k].float()).flatten() for k in keys])
    return float(delta.norm() / torch.cat([wa[k].float().flatten() for k in keys]).norm()), float(delta.abs().max())


def assert_close_runs(a, b, summary_a, summary_b):
    drift, largest = weight_drift(a, b)
    assert drift < 1e-7 and largest < 1e-6, f"{a.name}: weights drift {drift:.1e} (relative L2)"
    qa, qb = weights(a, "deployed"), weights(b, "deployed")  # Q(W): a level may flip where W sits on a threshold
    for k in qa:
        torch.testing.assert_close(qa[k], qb[k], atol=1e-6, rtol=0, msg=k)
    assert summary_a["selected"]["epoch"] == summary_b["selected"]["epoch"]
    for ha, hb in zip(summary_a["history"], summary_b["history"], strict=True):
        for key in ("train_loss", "train_acc", "val_natural_acc", "val_pgd_acc"):
            assert ha[key] == pytest.approx(hb[key], abs=1e-6), key
        assert (ha["eta"], ha["phase"], ha["lr"]) == (hb["eta"], hb["phase"], hb["lr"])


def test_stacked_runs_equal_separate_runs_and_resume_as_plain_runs(tmp_path, prepared_dir, float64):
    settings = settings_for(prepared_dir)
    experiments = [settings.experiment(r["name"]) for r in RUNS]
    alone = {e.name: train_mod.train(settings, e, tmp_path / "alone" / e.name, quiet=True,
                                     live_dir=tmp_path / "live-alone" / e.name) for e in experiments}
    together = train_stacked(settings, experiments, [tmp_path / "stacked" / e.name for e in experiments], quiet=True,
                             live_dirs=[tmp_path / "live-stacked" / e.name for e in experiments])
    for e, summary in zip(experiments, together):
        assert_close_runs(tmp_path / "alone" / e.name, tmp_path / "stacked" / e.name, alone[e.name], summary)
        assert summary["stacked_with"] == [x.name for x in experiments if x.name != e.name]
        assert not train_mod.RunPaths(tmp_path / "stacked" / e.name).incomplete.exists()
        log = json.loads((tmp_path / "live-stacked" / e.name / "metrics.json").read_text())
        assert log["step"] == 1 and {"val_pgd_acc", "eta"} <= set(log)

    # one stacked epoch, then the second epoch: stacked again for two runs, plain `train --resume` for the third
    short = settings_for(prepared_dir, epochs=1)
    dirs = [tmp_path / "resumed" / e.name for e in experiments]
    train_stacked(short, experiments, dirs, quiet=True, live_dirs=[d / "live" for d in dirs])
    train_stacked(settings, experiments[:2], dirs[:2], resume=True, quiet=True, live_dirs=[d / "live" for d in dirs[:2]])
    last = train_mod.train(settings, experiments[2], dirs[2], resume=True, quiet=True, live_dir=dirs[2] / "live")
    assert last["history"][0]["stacked_images_per_s"] > 0 and "stacked_images_per_s" not in last["history"][1]
    for e, d in zip(experiments, dirs):
        summary = json.loads(train_mod.RunPaths(d).summary.read_text())
        assert_close_runs(tmp_path / "alone" / e.name, d, alone[e.name], summary)


def test_an_ensemble_alone_trains_its_members_in_one_pass_as_train_does(tmp_path, prepared_dir, float64):
    """A stack of one En2 run (what `grid --stack` does with an ensemble that stacks with no other run): its two
    members are two groups of one network, and the run is the one `train` makes."""
    settings = settings_for(prepared_dir)
    e = settings.experiment("en2resnet8-binary-bc-pgd_at")
    alone = train_mod.train(settings, e, tmp_path / "alone", quiet=True, live_dir=tmp_path / "live-alone")
    [one_pass] = train_stacked(settings, [e], [tmp_path / "one-pass"], quiet=True, live_dirs=[tmp_path / "live-one"])
    assert_close_runs(tmp_path / "alone", tmp_path / "one-pass", alone, one_pass)
    assert one_pass["stacked_with"] == []


def test_runs_that_cannot_stack_or_continue_together_are_refused(tmp_path, prepared_dir):
    settings = settings_for(prepared_dir, epochs=1)
    pair = [settings.experiment("resnet8-fp-pgd_at"), settings.experiment("resnet14-fp-pgd_at")]
    with pytest.raises(config.ConfigError, match="share dataset, ResNet depth and loss kind"):
        train_stacked(settings, pair, [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(config.ConfigError, match="wrn10-1-fp-pgd_at cannot stack"):
        train_stacked(settings, [settings.experiment("wrn10-1-fp-pgd_at")], [tmp_path / "c"])
    a, b = settings.experiment("resnet8-fp-pgd_at"), settings.experiment("en1resnet8-ternary-br-pgd_at")
    train_mod.train(settings, a, tmp_path / a.name, quiet=True, live_dir=tmp_path / "live" / a.name)
    longer = settings_for(prepared_dir, epochs=2)
    with pytest.raises(train_mod.ResumeError, match="must continue from the same epoch"):
        train_stacked(longer, [a, b], [tmp_path / a.name, tmp_path / b.name], resume=True, quiet=True,
                      live_dirs=[tmp_path / "live" / a.name, tmp_path / "live" / b.name])


def test_stacks_group_compatible_runs_in_order_up_to_k(prepared_dir):
    settings = settings_for(prepared_dir)
    groups = stacks(settings, settings.experiments, 2)
    assert [[e.name for e in g] for g in groups] == [
        ["resnet8-fp-pgd_at", "en1resnet8-ternary-br-pgd_at"], ["en2resnet8-binary-bc-pgd_at"],
        ["resnet8-fp-natural"], ["resnet14-fp-pgd_at"], ["wrn10-1-fp-pgd_at"], ["resnet8-fp-trades"]]


def test_the_command_trains_the_named_runs_stacked(tmp_path, tiny_archive, monkeypatch):
    """`python -m paper_repro train-stacked -e A -e B` in a profile folder writes runs/A and runs/B (fp32)."""
    from paper_repro.data import prepare
    prepare(str(tiny_archive), tmp_path / "data" / "prepared")
    params = {"profile": "test", "data": {"prepared": "data/prepared", "expect_counts": None, "val_size": 30},
              "train": {**TINY, "epochs": 1, "relax": {"hard_epoch": 0}}, "experiments": {r["name"]: {
                  k: v for k, v in r.items() if k != "name"} for r in RUNS[:2]}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train-stacked", "-e", RUNS[0]["name"], "-e", RUNS[1]["name"], "--quiet"]) == 0
    for r in RUNS[:2]:
        summary = json.loads((tmp_path / "runs" / r["name"] / "train.json").read_text())
        assert summary["run"] == r["name"] and summary["selected"]["epoch"] == 1
        assert (tmp_path / "dvclive" / r["name"] / "metrics.json").is_file()
