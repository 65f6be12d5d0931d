"""`grid`'s plan (local executor): every profile's experiments get a cost and a job; the costliest train first."""
from __future__ import annotations

from pathlib import Path

import pytest

from paper_repro import config, grid

ROOT = Path(__file__).resolve().parents[1]
PROFILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*/params.yaml"))]


@pytest.mark.parametrize("path", PROFILES, ids=[str(p.relative_to(ROOT)) for p in PROFILES])
def test_every_profile_plans_a_train_and_an_evaluate_job_per_experiment(path: Path):
    """The paper profile's WideResNet and VGG runs (issue 16) once broke the ResNet-only cost formula."""
    settings = config.load(path)
    train, evaluate = grid.plan(settings, None, force=True)
    names = {e.name for e in settings.experiments}
    assert {j.experiment for j in train} == names == {j.experiment for j in evaluate}
    assert [j.cost for j in train] == sorted((j.cost for j in train), reverse=True)  # longest first


def cost(model: str, loss: str = "pgd_at") -> float:
    return grid.relative_cost(config.Experiment(name="x", model=model, loss=loss))


def test_costs_follow_size_ensemble_and_attack():
    assert cost("resnet20") == pytest.approx(4.0)            # PGD-AT: 4 ResNet20 passes per image
    assert cost("en5resnet20") == pytest.approx(5 * cost("resnet20"))
    assert cost("resnet56") > cost("resnet20") > cost("resnet20", "natural")
    assert 100 < cost("wrn34-10") / cost("resnet20") < 250  # 6.3 G vs 41 M MACs
    assert cost("en5wrn34-10") == pytest.approx(5 * cost("wrn34-10"))
    assert cost("resnet20") < cost("vgg11") < cost("vgg19")


def test_stack_groups_the_train_jobs_of_runs_that_share_a_data_pass():
    settings = config.load(ROOT / "profiles" / "smoke" / "params.yaml")
    train, evaluate = grid.plan(settings, None, force=True, stack=8)
    assert sorted(j.experiments for j in train) == sorted([
        ("resnet20-fp-pgd_at", "en1resnet20-fp-pgd_at", "en1resnet20-ternary-br-pgd_at", "en1resnet20-binary-bc-pgd_at"),
        ("en1resnet20-ternary-br-tradeoff",), ("en1resnet20-ternary-br-natural",)])
    assert all(len(j.experiments) == 1 for j in evaluate)  # evaluation stays one run per job
    stacked = next(j for j in train if j.stacked_with)
    argv = grid.command(stacked, Path("params.yaml"))
    assert argv[3] == "train-stacked" and argv.count("--experiment") == 4 and argv[-2:] == ["--resume", "--restart"]
    assert stacked.dvc_stages == [f"train@{e}" for e in stacked.experiments]
    assert stacked.cost == pytest.approx(sum(grid.relative_cost(settings.experiment(e)) for e in stacked.experiments))


def test_a_bad_stack_option_is_a_one_line_error(capsys):
    from paper_repro import cli
    assert cli.main(["grid", "--params", str(ROOT / "profiles" / "smoke" / "params.yaml"), "--stack", "0"]) == 2
    assert "grid --stack must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_grid_stack_trains_runs_together_and_dvc_records_each(tmp_path):
    """`grid --stack 2` on a DVC workspace: one train-stacked job for two runs, their evaluations, `dvc commit`; then
    DVC sees every stage of both runs up to date and each run's train.json names its partner."""
    import json
    import sys

    import yaml
    from test_pipeline import PROFILE, run
    from test_slurm import make_workspace, stage_status
    repo, env = make_workspace(tmp_path)
    profile = repo / PROFILE
    params = yaml.safe_load((profile / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / PROFILE / "params.yaml").read_text())
    pair = ["resnet20-fp-pgd_at", "en1resnet20-ternary-br-pgd_at"]
    params["experiments"] = {name: {**smoke["experiments"][name], "twin": name} for name in pair}  # the transfer
    # check then attacks the run itself (its float twin is not in this workspace)
    (profile / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "paper_repro", "grid", "--stack", "2", "-j", "2"], profile, env)
    assert "grid: 3 jobs (1 train, 2 evaluate)" in out, out[-2000:]
    assert "train@resnet20-fp-pgd_at + train@en1resnet20-ternary-br-pgd_at done" in out, out[-2000:]
    for name in pair:
        summary = json.loads((profile / "runs" / name / "train.json").read_text())
        assert summary["stacked_with"] == [n for n in pair if n != name]
        assert (profile / "metrics" / f"{name}.json").is_file()
    assert not {s for s in stage_status(profile, env) if s.split("@")[0] in ("train", "evaluate")}


def test_an_ensemble_alone_in_its_stack_trains_its_members_in_one_pass():
    """With --stack, an En_k run (k > 1) that stacks with no other run is still one grouped network (train-stacked
    of one run); a plain model alone, or --stack 1, keeps `train`."""
    settings = config.load(ROOT / "params.yaml")
    names = ["en5resnet20-fp-pgd_at", "resnet20-fp-pgd_at"]
    [train, _] = grid.plan(settings, names[:1], force=True, stack=8)
    assert [(j.experiments, j.one_pass) for j in train] == [(("en5resnet20-fp-pgd_at",), True)]
    argv = grid.command(train[0], Path("params.yaml"))
    assert argv[3] == "train-stacked" and argv.count("--experiment") == 1
    [plain, _] = grid.plan(settings, names[1:], force=True, stack=8)
    assert not plain[0].one_pass and grid.command(plain[0], Path("params.yaml"))[3] == "train"
    [unstacked, _] = grid.plan(settings, names[:1], force=True, stack=1)
    assert not unstacked[0].one_pass and grid.command(unstacked[0], Path("params.yaml"))[3] == "train"
