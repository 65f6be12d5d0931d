"""`train --time-budget` (issue 14): stops at an epoch boundary with exit 75, and `--resume` then finishes
a run identical, bit for bit, to an uninterrupted one."""
from __future__ import annotations

import itertools

import pytest
import torch
import yaml

from paper_repro import checkpoint, cli, runtime, train as train_mod
from paper_repro.runtime import EXIT_BUDGET_REACHED, EpochBudget
from test_train import EXPERIMENTS, TINY_TRAIN

RUN = "en1resnet20-ternary-br-tradeoff"  # BR phases, noise and the trade-off loss
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def fake_clock(monkeypatch):
    """Every reading of the budget clock is 10 s after the previous one (0, 10, 20, ...)."""
    ticks = itertools.count(0, 10)
    monkeypatch.setattr(runtime, "budget_clock", lambda: float(next(ticks)))


def write_params(tmp_path, prepared_dir):
    raw = {"profile": "test", "data": {"prepared": str(prepared_dir), "expect_counts": None, "val_size": 30},
           "train": {**TINY_TRAIN, "epochs": 3}, "experiments": EXPERIMENTS}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(params, tmp_path, name, *extra):
    return cli.main(["train", "--params", str(params), "-e", RUN, "--quiet", "--run-dir", str(tmp_path / name),
                     "--live-dir", str(tmp_path / f"live-{name}"), *extra])


def test_budget_stop_and_resume_equal_an_uninterrupted_run(tmp_path, prepared_dir, fake_clock, capsys):
    params = write_params(tmp_path, prepared_dir)
    assert run_cli(params, tmp_path, "straight") == 0
    # fake clock: epochs take 10 s; after two epochs 40 s are used and the third would end at 60 s > 45 s
    assert run_cli(params, tmp_path, "pieces", "--time-budget", "45") == EXIT_BUDGET_REACHED
    out = capsys.readouterr().out
    assert "stopped after epoch 2/3" in out and "continue with --resume" in out
    paths = train_mod.RunPaths(tmp_path / "pieces")
    assert checkpoint.read_sidecar(paths.state)["epochs_done"] == 2 and not paths.summary.exists()
    assert run_cli(params, tmp_path, "pieces", "--resume", "--time-budget", "1000") == 0
    for which in ("state", "deployed", "float_weights"):
        a, _ = checkpoint.load(getattr(train_mod.RunPaths(tmp_path / "straight"), which))
        b, _ = checkpoint.load(getattr(paths, which))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    rows = (tmp_path / "live-pieces" / "plots" / "metrics" / "val_pgd_acc.tsv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 epochs, none repeated


def test_a_budget_shorter_than_one_epoch_is_refused(tmp_path, prepared_dir, fake_clock, capsys):
    params = write_params(tmp_path, prepared_dir)
    assert run_cli(params, tmp_path, "run", "--time-budget", "25") == EXIT_BUDGET_REACHED  # one epoch done
    capsys.readouterr()
    # resumed: the measured epoch says the next one cannot fit 5 s; stopping again would loop forever
    assert run_cli(params, tmp_path, "run", "--resume", "--time-budget", "5") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shorter than one epoch" in err


@pytest.mark.parametrize("value", ["0", "-3", "nan", "soon"])
def test_bad_budget_values_fail_at_parse(tmp_path, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "-e", RUN, "--time-budget", value])
    assert exit_info.value.code == 2 and "positive number of seconds" in capsys.readouterr().err


def test_estimate_is_the_longer_of_the_last_epoch_and_earlier_calls(fake_clock):
    budget = EpochBudget(100, prior_epoch_s=15)           # clock 0
    assert budget.estimate() == 15
    assert budget.next_epoch_fits()                         # 10 + 15 <= 100
    budget.epoch_done()                                     # 20: last epoch took 10 s
    assert budget.estimate() == 15
    budget.prior = 5
    assert budget.estimate() == 10
    with pytest.raises(ValueError, match="positive number"):
        EpochBudget(0)
