"""The DVC pipeline end to end, in a temporary git copy of the project, on a synthetic archive.

Checks what a reproducer and a reviewer rely on: the smoke pipeline runs from prepare to the report;
a second `dvc repro` runs nothing; an evaluation-only parameter reruns evaluate/verify/report only;
push to a local remote + pull into a fresh clone + `dvc repro --pull --allow-missing` trains nothing;
two queued experiments run with two workers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from archive_factory import make_archive

ROOT = Path(__file__).resolve().parents[1]
PROFILE = "profiles/smoke"
TINY_DATA = {"train_limit": None, "test_limit": None, "expect_counts": None, "val_size": 30}
TINY_TRAIN = {"epochs": 1, "batch_size": 60, "milestones": [], "pgd": {"steps": 1}, "val_attack": {"steps": 1},
              "relax": {"hard_epoch": 0}}
TINY_EXPERIMENTS = ("resnet20-fp-pgd_at", "en1resnet20-ternary-br-tradeoff")


def tiny_params(smoke: dict) -> dict:
    """The smoke profile shrunk to seconds: same keys, smaller data, one epoch, two experiments."""
    params = dict(smoke)
    params["data"] = {**smoke["data"], **TINY_DATA}
    params["train"] = {**smoke["train"], **TINY_TRAIN}
    params["experiments"] = {k: v for k, v in smoke["experiments"].items() if k in TINY_EXPERIMENTS}
    ev = dict(smoke["evaluate"])
    ev.update({"n_examples": 20, "seeds": [0], "audit_examples": 8, "sanity_examples": 8, "square_queries": 10})
    params["evaluate"] = ev
    return params


def run(cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}")
    return out


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(?:[^']*:)?([^']+)'", output))


def project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    repo = base / "repo"
    for rel in project_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    smoke = yaml.safe_load((repo / PROFILE / "params.yaml").read_text())
    (repo / PROFILE / "params.yaml").write_text(yaml.safe_dump(tiny_params(smoke), sort_keys=False))
    archive = make_archive(base / "cifar-10-python.tar.gz", per_class_train=3, per_class_test=2)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "CIFAR10_ARCHIVE": str(archive), "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "CI": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PYTHONPATH": str(repo)}
    remote = base / "remote"
    run(["git", "init", "-q"], repo, env)
    run([sys.executable, "-m", "dvc", "remote", "modify", "local", "url", str(remote)], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "copy"], repo, env)
    first = run([sys.executable, "-m", "dvc", "repro"], repo / PROFILE, env)
    return {"repo": repo, "env": env, "remote": remote, "first": first, "base": base}


@pytest.mark.slow
def test_smoke_pipeline_produces_reports_and_verification(workspace):
    out = workspace["repo"] / PROFILE
    stages = ran_stages(workspace["first"])
    assert {"prepare", "train@resnet20-fp-pgd_at", "evaluate@en1resnet20-ternary-br-tradeoff", "verify",
            "report"} <= stages
    assert (out / "reports" / "verification.md").is_file()
    verification = json.loads((out / "reports" / "verification.json").read_text())
    assert verification["provenance"] and "not comparable" in (out / "reports" / "verification.md").read_text()
    htmls = sorted(p.name for p in (out / "reports" / "notebooks").glob("*.html"))
    assert len(htmls) == len(list((workspace["repo"] / "notebooks").glob("*.ipynb")))
    assert list((out / "reports" / "figures").glob("*.png")) and list((out / "reports" / "tables").glob("*.csv"))
    metrics = json.loads((out / "metrics" / "resnet20-fp-pgd_at.json").read_text())
    assert metrics["profile"] == "smoke" and metrics["data"]["official"] is False
    assert (out / "dvclive" / "resnet20-fp-pgd_at" / "metrics.json").is_file()
    compact = json.loads((out / "reports" / "metrics.json").read_text())
    assert set(compact) == set(TINY_EXPERIMENTS) and {"natural_mean", "cw_ref_mean"} <= set(compact["resnet20-fp-pgd_at"])
    assert compact["en1resnet20-ternary-br-tradeoff"]["size_compression"] > 10
    shown = run([sys.executable, "-m", "dvc", "metrics", "show", "reports/metrics.json"], out, workspace["env"])
    assert "cw_ref_mean" in shown and "resnet20-fp-pgd_at" in shown


@pytest.mark.slow
def test_second_repro_runs_nothing(workspace):
    out = run([sys.executable, "-m", "dvc", "repro"], workspace["repo"] / PROFILE, workspace["env"])
    assert ran_stages(out) == set(), out


@pytest.mark.slow
def test_evaluation_parameter_reruns_only_evaluation_and_what_follows(workspace):
    repo, env = workspace["repo"], workspace["env"]
    params_path = repo / PROFILE / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["evaluate"]["seeds"] = [0, 1]
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "dvc", "repro"], repo / PROFILE, env)
    stages = ran_stages(out)
    assert stages and all(s.startswith(("evaluate@", "verify", "report")) for s in stages), stages
    assert {"verify", "report"} <= stages
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "two seeds"], repo, env)


def dvc_changed(cwd: Path, env: dict[str, str]) -> set[str]:
    # name the pipeline: without a target DVC also reports the other profiles' pipelines in the repository
    status = json.loads(run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], cwd, env) or "{}")
    return {name.split(":")[-1] for name in status}


@pytest.mark.slow
def test_a_code_default_change_reruns_exactly_the_stages_that_import_it(workspace):
    """Every code dependency is declared: editing a module shows exactly the stages importing it as changed."""
    repo, env = workspace["repo"], workspace["env"]
    assert dvc_changed(repo / PROFILE, env) == set()
    for module, expected in (("paper_repro/checks.py", {"verify", "report"}),
                             ("paper_repro/config.py", None)):
        path = repo / module
        original = path.read_text()
        path.write_text(original + "\n# a changed default\n")
        try:
            changed = dvc_changed(repo / PROFILE, env)
        finally:
            path.write_text(original)
        if expected is None:  # config.py holds the defaults: every stage reads it
            assert {"prepare", "verify", "report"} <= changed and any(s.startswith("train@") for s in changed)
        else:
            assert changed == expected, (module, changed)
    assert dvc_changed(repo / PROFILE, env) == set()


@pytest.mark.slow
def test_grid_runs_outdated_jobs_in_parallel_and_dvc_records_them(workspace):
    repo, env = workspace["repo"], workspace["env"]
    params_path = repo / PROFILE / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["train"]["seed"] = 1
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = run([sys.executable, "-m", "paper_repro", "grid", "-j", "2", "--quiet"], repo / PROFILE, env)
    assert "4 jobs (2 train, 2 evaluate), 2 at once" in out, out
    assert dvc_changed(repo / PROFILE, env) == {"verify", "report"}  # the jobs' outputs are recorded
    sidecar = json.loads((repo / PROFILE / "runs" / "resnet20-fp-pgd_at" / "train.json").read_text())
    assert sidecar["train"]["seed"] == 1
    stages = ran_stages(run([sys.executable, "-m", "dvc", "repro"], repo / PROFILE, env))
    assert stages == {"verify", "report"}, stages
    again = run([sys.executable, "-m", "paper_repro", "grid", "-j", "2"], repo / PROFILE, env)
    assert "up to date" in again
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "seed 1 via grid"], repo, env)


@pytest.mark.slow
def test_push_pull_and_repro_trains_nothing(workspace):
    repo, env, base = workspace["repo"], workspace["env"], workspace["base"]
    run([sys.executable, "-m", "dvc", "push", "dvc.yaml"], repo / PROFILE, env)
    clone = base / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], base, env)
    out = run([sys.executable, "-m", "dvc", "repro", "--pull", "--allow-missing"], clone / PROFILE,
              {**env, "PYTHONPATH": str(clone)})
    assert not any(s.startswith(("train@", "prepare")) for s in ran_stages(out)), out
    run([sys.executable, "-m", "dvc", "pull", "dvc.yaml"], clone / PROFILE, {**env, "PYTHONPATH": str(clone)})
    assert (clone / PROFILE / "runs" / "resnet20-fp-pgd_at" / "deployed.safetensors").is_file()
    assert (clone / PROFILE / "reports" / "verification.md").is_file()


@pytest.mark.slow
def test_queued_experiments_run_with_two_workers(workspace):
    repo, env = workspace["repo"], workspace["env"]
    for seeds in ("[0]", "[1]"):
        run([sys.executable, "-m", "dvc", "exp", "run", "--queue", f"{PROFILE}/dvc.yaml",
             "-S", f"{PROFILE}/params.yaml:evaluate.seeds={seeds}"], repo, env)
    run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], repo, env)
    deadline = time.time() + 900
    status = ""
    while time.time() < deadline:
        status = run([sys.executable, "-m", "dvc", "queue", "status"], repo, env)
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(5)
    logs = "".join(run([sys.executable, "-m", "dvc", "queue", "logs", line.split()[0]], repo, env, check=False)[-3000:]
                   for line in status.splitlines() if "Failed" in line)
    assert status.count("Success") == 2, status + logs
    shown = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], repo, env))
    assert shown


def test_profile_pipelines_are_the_root_pipeline_with_their_own_root():
    root_text = (ROOT / "dvc.yaml").read_text()
    profiles = sorted((ROOT / "profiles").glob("*/dvc.yaml"))
    assert {p.parent.name for p in profiles} >= {"smoke", "cpu"}
    for path in profiles:
        assert path.read_text() == root_text.replace("  - root: .\n", "  - root: ../..\n"), \
            f"{path} drifted from dvc.yaml (copy it: sed 's|root: .$|root: ../..|' dvc.yaml > {path})"


def test_every_profile_loads_and_keeps_its_outputs_apart():
    from paper_repro import config
    prepared = set()
    for params in [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*/params.yaml"))]:
        settings = config.load(params)
        assert settings.profile == (params.parent.name if params.parent != ROOT else "paper")
        prepared.add((params.parent / settings.data.prepared).resolve())
        assert settings.experiments, f"{params} lists no experiments"
    assert len(prepared) == 1 + len(list((ROOT / "profiles").glob("*/params.yaml")))
