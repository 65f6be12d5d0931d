"""`grid --executor slurm` (issue 15): option checks and the requeue callable without a cluster, then the
whole path against a real one-node Slurm cluster (tests/slurm_cluster.sh starts it).

The cluster test submits two tiny experiments as Slurm job arrays, with one training driven into its
time limit after its first epoch (tests/slurm_hooks/sitecustomize.py, read only by this test), so that
submitit's checkpoint requeues it and the requeued attempt resumes after epoch 1. The metrics must equal
those of a local `grid` run of the same experiments, and `dvc status` must be clean for the train and
evaluate stages afterwards. A second cluster test runs `grid --stack 2`: one train-stacked job for two runs,
driven into its time limit after its first epoch the same way, requeued and resumed for both runs, then their
evaluations; both runs' metrics, weights and last state must equal a local `grid --stack 2` run's and their
stages be recorded. In CI (CI set) a cluster that cannot be started fails the test.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from test_pipeline import PROFILE, project_files, run, tiny_params

from paper_repro import cli, grid, slurm
from paper_repro.config import ConfigError
from paper_repro.runtime import RunPaths

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = ROOT / "tests" / "slurm_cluster.sh"
HOOKS = ROOT / "tests" / "slurm_hooks"
SLOW_RUN = "en1resnet20-ternary-br-tradeoff"  # times out after epoch 1 in its first Slurm attempt
FAST_RUN = "resnet20-fp-pgd_at"
# Keys that differ between two identical runs: timings, and the hash of the weights file, whose header
# (safetensors metadata) is written in a per-process order; the tensors themselves are compared exactly.
VOLATILE = {"seconds", "timing", "wall_s", "weights_sha256"}


# --------------------------------------------------------------------------- settings, no cluster
def slurm_args(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser("grid").parse_args(["grid", "--executor", "slurm", *argv])


def test_settings_merge_the_file_and_the_command_line(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text(yaml.safe_dump({"partition": "gpu", "time_min": 600, "gpus": 1, "cpus": 8,
                                      "sbatch": {"account": "proj", "qos": "normal"}}))
    s = slurm.settings_from(slurm_args(["--slurm-config", str(config), "--cpus", "4", "--sbatch", "qos=long",
                                        "--mem-gb", "16"]))
    assert (s.partition, s.time_min, s.gpus, s.cpus, s.mem_gb) == ("gpu", 600, 1, 4, 16.0)
    assert s.sbatch == {"account": "proj", "qos": "long"}
    params = s.executor_parameters("train-x")
    assert params["gpus_per_node"] == 1 and params["time"] == 600 and params["additional_parameters"]["qos"] == "long"


@pytest.mark.parametrize("argv, message", [
    ([], "needs a time limit: --time-min"),
    (["--time-min", "0"], "time_min must be >= 1"),
    (["--time-min", "1"], "leaves no time before the requeue signal"),
    (["--time-min", "60", "--sbatch", "account"], "expected KEY=VALUE"),
    (["--time-min", "60", "--sbatch", "time=10"], "'time' is set by grid; use --time-min"),
    (["--time-min", "60", "--sbatch=--array=0-3"], "'array' is set by grid"),
    (["--time-min", "60", "--cpus", "0"], "cpus must be >= 1"),
    (["--time-min", "60", "--partition", " "], "partition must not be empty"),
])
def test_bad_slurm_settings_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        slurm.settings_from(slurm_args(argv))
    assert "\n" not in str(err.value)


def test_a_bad_slurm_config_file_names_the_key(tmp_path):
    config = tmp_path / "slurm.yaml"
    config.write_text("time_min: 60\ngpu: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'gpu'"):
        slurm.settings_from(slurm_args(["--slurm-config", str(config)]))
    config.write_text("time_min: sixty\n")
    with pytest.raises(ConfigError, match="time_min must be an integer"):
        slurm.settings_from(slurm_args(["--slurm-config", str(config)]))
    config.write_text("time_min: 60\nsbatch: [account]\n")
    with pytest.raises(ConfigError, match="sbatch must be a mapping"):
        slurm.settings_from(slurm_args(["--slurm-config", str(config)]))
    with pytest.raises(ConfigError, match="no such file"):
        slurm.settings_from(slurm_args(["--slurm-config", str(tmp_path / "missing.yaml")]))


@pytest.mark.parametrize("argv, message", [
    (["grid", "--partition", "gpu"], "grid --partition applies to --executor slurm only"),
    (["grid", "--no-wait"], "grid --no-wait applies to --executor slurm only"),
    (["grid", "--executor", "slurm", "-j", "2", "--time-min", "60"], "with slurm use --array-parallelism"),
    (["grid", "--executor", "slurm", "--stack", "0", "--time-min", "60"], "grid --stack must be >= 1, got 0"),
])
def test_options_of_the_other_executor_are_rejected(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_without_slurm_commands_grid_says_where_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, srun, sacct, squeue
    monkeypatch.chdir(tmp_path)
    params = str(ROOT / PROFILE / "params.yaml")
    assert cli.main(["grid", "--params", params, "--executor", "slurm", "--time-min", "60"]) == 2
    err = capsys.readouterr().err
    assert "sbatch, srun, sacct, squeue not found on PATH: run grid on a Slurm login node" in err, err
    assert cli.main(["grid", "--params", params, "--executor", "slurm", "--attach"]) == 2
    assert "not found on PATH" in capsys.readouterr().err


# --------------------------------------------------------------------------- the requeue callable
CHILD = ("import signal, sys, time\n"
         "print('started', flush=True)\n"
         "try:\n    time.sleep(60)\n"
         "except KeyboardInterrupt:\n    print('interrupted: state kept', flush=True); sys.exit(130)\n")


def start_stage_job(tmp_path, argv_tail):
    job = slurm.StageJob([sys.executable, "-c", CHILD, *argv_tail], tmp_path, tmp_path / "logs" / "stage.log")
    outcome = {}

    def target():
        try:
            outcome["result"] = job()
        except Exception as e:  # the StageFailed of an interrupted command
            outcome["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    log, deadline = tmp_path / "logs" / "stage.log", time.time() + 30
    while not (log.exists() and "\nstarted\n" in log.read_text()):  # the header quotes the source
        assert time.time() < deadline, "the child command did not start"
        time.sleep(0.1)
    return job, thread, outcome


@pytest.mark.parametrize("command", [["train", "--experiment", "x"], ["train-stacked", "-e", "x", "-e", "y"]])
def test_checkpoint_stops_the_command_and_requeues_it_with_resume(tmp_path, command):
    job, thread, outcome = start_stage_job(tmp_path, command)
    os.kill(job._proc.pid, signal.SIGUSR2)  # Slurm signals the whole step: the command must ignore it
    time.sleep(0.5)
    assert job._proc.poll() is None, "SIGUSR2 killed the stage command"
    delayed = job.checkpoint()
    thread.join(30)
    assert isinstance(outcome.get("error"), slurm.StageFailed) and "exited with 130" in str(outcome["error"])
    log = (tmp_path / "logs" / "stage.log").read_text()
    assert "interrupted: state kept" in log and "requeued with --resume" in log
    again = pickle.loads(pickle.dumps(delayed.function))
    assert again.argv[-1] == "--resume" and again.argv[:-1] == job.argv and again._proc is None


def test_evaluate_is_requeued_unchanged(tmp_path):
    job, thread, _ = start_stage_job(tmp_path, ["evaluate", "--experiment", "x"])
    delayed = job.checkpoint()
    thread.join(30)
    assert delayed.function.argv == job.argv


# --------------------------------------------------------------------------- a stacked job in the manifest
def manifest_of(tmp_path: Path) -> dict:
    """A submission with one stacked training (a + b), one training written before --stack ran on Slurm (c: no
    stacked_with key) and an evaluation per run."""
    def entry(stage, names, job_id):
        stacked = {"stacked_with": names[1:]} if len(names) > 1 else {}
        return {"stage": stage, "experiment": names[0], "job_id": job_id, "log": f"{stage}-{names[0]}.log",
                "slurm_log": f"{job_id}.out", **stacked}
    jobs = [entry("train", ["a", "b"], "7_0"), entry("train", ["c"], "7_1"),
            *(entry("evaluate", [n], f"8_{i}") for i, n in enumerate("abc"))]
    return {"workdir": str(tmp_path), "folder": str(tmp_path / "slurm"), "commit": True, "jobs": jobs}


@pytest.mark.parametrize("states, committed, failed", [
    ({"7_0": "COMPLETED", "7_1": "FAILED"}, ["train@a", "train@b"], ["train@c", "evaluate@a"]),
    ({"7_0": "FAILED", "7_1": "COMPLETED"}, ["train@c"], ["train@a + train@b", "evaluate@c"]),
])
def test_a_stacked_job_commits_or_fails_every_train_stage_it_covers(tmp_path, monkeypatch, capsys, states,
                                                                    committed, failed):
    """The local executor's semantics (grid.main): all of a stacked training's stages are done, or all failed."""
    manifest = manifest_of(tmp_path)
    assert "submitted 2 train job(s) as Slurm job 7: 7_0=a+b, 7_1=c" in slurm.describe(manifest)
    by_id = {e.job_id: e.dvc_stage for e in slurm.entries_of(manifest)}
    monkeypatch.setattr(slurm, "poll_states", lambda jobs: {by_id[i]: states.get(i, "CANCELLED") for i in by_id})
    monkeypatch.setattr(slurm, "require_slurm", lambda: None)
    follow = slurm.follow
    monkeypatch.setattr(slurm, "follow", lambda m: follow(m, out=sys.stdout))  # its default: the stdout of import
    recorded = []
    monkeypatch.setattr(grid, "commit", recorded.append)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(params=Path("params.yaml"), no_commit=False)
    assert grid.finish_slurm(args, manifest) == 1
    out, err = capsys.readouterr()
    assert recorded == [committed]
    assert f"grid: train@a + train@b (job 7_0) {'done' if 'train@a' in committed else 'FAILED (FAILED)'}" in out, out
    assert "5 jobs: 0 pending, 0 running, 1 done, 4 failed" in out and "; 1 done, 4 failed; dvc.lock" in out, out
    assert all(f"grid: {name} failed: see " in err for name in failed), err


# --------------------------------------------------------------------------- a real cluster
def cannot(reason: str):
    """In CI a missing cluster is a failure (the test must run there); elsewhere a skip with the reason."""
    if os.environ.get("CI"):
        pytest.fail(f"Slurm cluster unavailable in CI: {reason}")
    pytest.skip(reason)


def free_ports(n: int) -> list[str]:
    """``n`` distinct TCP ports that are free now, below the ephemeral range (where the kernel picks the
    local ports of outgoing connections, which could take one before a daemon binds it)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports: list[str] = []
    for port in random.Random(os.getpid()).sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(str(port))
        if len(ports) == n:
            return ports
    raise RuntimeError("no free TCP ports for the test cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Slurm cluster (controller, node, slurmdbd + MariaDB, munge) for this module."""
    have_slurm = all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "slurmdbd"))
    if os.geteuid() != 0 and not have_slurm:
        cannot("Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge slurmdbd "
               "mariadb-server)")
    folder = tmp_path_factory.mktemp("slurm")
    ports = dict(zip(("SLURM_TEST_CTLD_PORT", "SLURM_TEST_SLURMD_PORT", "SLURM_TEST_DBD_PORT", "SLURM_TEST_DB_PORT"),
                     free_ports(4)))  # a second test session on the machine gets its own cluster
    started = time.perf_counter()
    try:
        proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up", str(folder)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, **ports})
        failure = f"failed ({proc.returncode}): {proc.stderr.strip()[-800:]}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        failure = "did not finish within 300 s"
    took = time.perf_counter() - started
    if failure:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(folder)], capture_output=True, timeout=120)
        cannot(f"tests/slurm_cluster.sh up {failure} (logs in {folder}/log)")
    print(f"\nslurm cluster set up in {took:.1f} s", flush=True)
    conf = proc.stdout.strip().splitlines()[-1].partition("=")[2]
    yield {"SLURM_CONF": conf}
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(folder)], capture_output=True, timeout=120)


def make_workspace(base: Path) -> tuple[Path, dict[str, str]]:
    """A git+DVC copy of the project: the smoke profile shrunk to two experiments of two epochs, prepared."""
    repo = base / "repo"
    for rel in project_files():
        if rel.startswith("profiles/") and not rel.startswith(PROFILE + "/"):
            continue  # one profile is enough; DVC parses every dvc.yaml it finds
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    smoke = yaml.safe_load((repo / PROFILE / "params.yaml").read_text())
    params = tiny_params(smoke)
    params["train"]["epochs"] = 2  # one epoch is saved before the time limit, one runs after the requeue
    (repo / PROFILE / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from archive_factory import make_archive
    archive = make_archive(base / "cifar-10-python.tar.gz", per_class_train=3, per_class_test=2)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "CIFAR10_ARCHIVE": str(archive), "PATH": bin_dir + os.pathsep + os.environ["PATH"],
           "CI": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PYTHONPATH": str(repo)}
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "copy"], repo, env)
    run([sys.executable, "-m", "dvc", "repro", "prepare"], repo / PROFILE, env)
    return repo, env


def comparable(value):
    """A metrics document without what differs between two identical runs (see VOLATILE)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def metrics_of(profile: Path) -> dict:
    return {p.name: comparable(json.loads(p.read_text())) for p in sorted((profile / "metrics").glob("*.json"))}


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file
    import torch
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def stage_status(profile: Path, env: dict[str, str]) -> set[str]:
    """Stages of this profile's pipeline that `dvc status` reports as changed."""
    return set(json.loads(run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], profile, env) or "{}"))


@pytest.mark.slow
def test_grid_on_slurm_requeues_a_timed_out_training_and_matches_a_local_run(cluster, tmp_path):
    repo, env = make_workspace(tmp_path / "slurm")
    local = tmp_path / "local"
    shutil.copytree(repo, local, symlinks=True)
    threads = max(1, (os.cpu_count() or 1) // 2)  # the same thread count in both runs: identical numbers

    started = time.perf_counter()
    run([sys.executable, "-m", "paper_repro", "grid", "-j", "2"], local / PROFILE, {**env, "PYTHONPATH": str(local)})
    local_s = time.perf_counter() - started

    profile = repo / PROFILE
    job_env = {**env, **cluster, "PATH": f"{env['PATH']}:/usr/sbin:/sbin",
               "PYTHONPATH": f"{HOOKS}{os.pathsep}{repo}", "PAPER_REPRO_TEST_SLOW_AFTER_EPOCH1": SLOW_RUN}
    started = time.perf_counter()
    out = run([sys.executable, "-m", "paper_repro", "grid", "--executor", "slurm", "--time-min", "2",
               "--signal-delay-s", "30", "--cpus", str(threads), "--mem-gb", "1", "--no-wait"], profile, job_env)
    assert "submitted 2 train job(s) as Slurm job" in out and "submitted 2 evaluate job(s)" in out, out
    follow_up = re.search(r"record their results with: (python -m paper_repro grid .*--attach.*)$", out, re.M)
    assert follow_up, out
    again = run([sys.executable, "-m", "paper_repro", "grid", "--executor", "slurm", "--time-min", "2",
                 "--signal-delay-s", "30"], profile, job_env, check=False)
    assert "still queued or running" in again, again  # no second submission over a running one
    attached = subprocess.run(follow_up.group(1).split(), cwd=profile, env=job_env, capture_output=True, text=True,
                              timeout=900)
    slurm_s = time.perf_counter() - started
    print(f"\nlocal grid {local_s:.0f} s; slurm grid (submit to commit) {slurm_s:.0f} s", flush=True)
    report = attached.stdout + attached.stderr
    assert attached.returncode == 0, report + logs_of(profile)
    assert "4 jobs: 0 pending, 0 running, 4 done, 0 failed" in report, report

    slow_log = (profile / "logs" / "grid" / f"train-{SLOW_RUN}.log").read_text()
    assert "attempt 2" in slow_log and "requeued with --resume" in slow_log, slow_log
    assert f"resuming {SLOW_RUN} after epoch 1" in slow_log, slow_log
    train_id = json.loads((profile / slurm.MANIFEST).read_text())["jobs"][0]["job_id"].split("_")[0]
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", train_id],
                             env=job_env, capture_output=True, text=True).stdout
    assert "REQUEUED" in history, history

    assert set(metrics_of(profile)) == {f"{SLOW_RUN}.json", f"{FAST_RUN}.json"}
    assert metrics_of(profile) == metrics_of(local / PROFILE)
    for name in (SLOW_RUN, FAST_RUN):
        ours, theirs = RunPaths(profile / "runs" / name), RunPaths(local / PROFILE / "runs" / name)
        assert same_weights(ours.deployed, theirs.deployed), name
        # the selected model may be epoch 1's: the epoch after the requeue is checked in its state and numbers
        assert same_weights(ours.state, theirs.state), name
        assert history_of(ours) == history_of(theirs), name
    assert stage_status(profile, env) == {"verify", "report"}  # train@ and evaluate@ are recorded in dvc.lock


def logs_of(profile: Path) -> str:
    """Every job log, for a failure message."""
    parts = []
    for path in sorted((profile / "logs").rglob("*")):
        if path.is_file() and path.suffix in (".log", ".out"):
            parts.append(f"--- {path}\n{path.read_text()[-3000:]}")
    return "\n".join(parts)


@pytest.mark.slow
def test_a_failed_training_is_reported_with_its_log_and_cancels_the_evaluations(cluster, tmp_path):
    repo, env = make_workspace(tmp_path / "slurm")
    profile = repo / PROFILE
    job_env = {**env, **cluster, "PATH": f"{env['PATH']}:/usr/sbin:/sbin",
               "PYTHONPATH": f"{HOOKS}{os.pathsep}{repo}", "PAPER_REPRO_TEST_FAIL_TRAINING": SLOW_RUN}
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "grid", "--executor", "slurm", "--time-min", "10"],
                          cwd=profile, env=job_env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    log = profile / "logs" / "grid" / f"train-{SLOW_RUN}.log"
    assert f"train@{SLOW_RUN} (job " in out and f"FAILED (FAILED): log {log}" in out, out
    assert "this training fails on purpose" in log.read_text()
    assert f"evaluate@{FAST_RUN} (job " in out and "FAILED (a training it depends on failed)" in out, out
    assert "4 jobs: 0 pending, 0 running, 1 done, 3 failed" in out, out
    changed = stage_status(profile, env)  # the successful training is recorded, nothing else
    assert f"train@{FAST_RUN}" not in changed and {f"train@{SLOW_RUN}", f"evaluate@{FAST_RUN}"} <= changed


@pytest.mark.slow
def test_grid_stack_on_slurm_trains_two_runs_in_one_array_job_and_records_both(cluster, tmp_path):
    """`grid --executor slurm --stack 2`: ONE train-stacked job for two runs, then one evaluation each. The stacked
    job sleeps after its first epoch in its first attempt (tests/slurm_hooks), reaches its time limit, is requeued
    with --resume and continues both runs after epoch 1; then both runs' metrics and weights equal those of a local
    `grid --stack 2` run, and every train and evaluate stage of both runs is recorded in dvc.lock."""
    repo, env = make_workspace(tmp_path / "slurm")  # two epochs: one before the time limit, one after the requeue
    profile = repo / PROFILE
    params = yaml.safe_load((profile / "params.yaml").read_text())
    smoke = yaml.safe_load((ROOT / PROFILE / "params.yaml").read_text())
    pair = ["resnet20-fp-pgd_at", "en1resnet20-ternary-br-pgd_at"]  # same data pass: they stack
    # each its own twin: the transfer check then attacks the run itself (its float twin is not in this workspace)
    params["experiments"] = {name: {**smoke["experiments"][name], "twin": name} for name in pair}
    (profile / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    local = tmp_path / "local"
    shutil.copytree(repo, local, symlinks=True)
    threads = max(1, (os.cpu_count() or 1) // 2)  # the same thread count in both runs: identical numbers
    log = profile / "logs" / "grid" / f"train-{pair[0]}+1.log"

    job_env = {**env, **cluster, "PATH": f"{env['PATH']}:/usr/sbin:/sbin",
               "PYTHONPATH": f"{HOOKS}{os.pathsep}{repo}", "PAPER_REPRO_TEST_SLOW_AFTER_EPOCH1": pair[1]}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "paper_repro", "grid", "--executor", "slurm", "--stack", "2",
                             "--time-min", "2", "--signal-delay-s", "30", "--cpus", str(threads), "--mem-gb", "2"],
                            cwd=profile, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # The local run while the stacked job sleeps towards its time limit (after its first epoch, which must
        # finish before the limit: the local run does not compete with it).
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (
                log.is_file() and "[test hook]" in log.read_text()):
            time.sleep(1)
        local_started = time.perf_counter()
        run([sys.executable, "-m", "paper_repro", "grid", "--stack", "2", "-j", "2"], local / PROFILE,
            {**env, "PYTHONPATH": str(local)})
        local_s = time.perf_counter() - local_started
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    slurm_s = time.perf_counter() - started
    print(f"\nlocal grid --stack 2 {local_s:.0f} s; slurm grid --stack 2 (submit to commit) {slurm_s:.0f} s", flush=True)
    assert proc.returncode == 0, out + logs_of(profile)
    assert re.search(rf"submitted 1 train job\(s\) as Slurm job \d+: \S+={pair[0]}\+{pair[1]}$", out, re.M), out
    assert "submitted 2 evaluate job(s)" in out, out
    assert f"train@{pair[0]} + train@{pair[1]} (job " in out and "3 jobs: 0 pending, 0 running, 3 done, 0 failed" in out
    entry = json.loads((profile / slurm.MANIFEST).read_text())["jobs"][0]
    assert (entry["experiment"], entry["stacked_with"]) == (pair[0], pair[1:])
    stacked_log = log.read_text()
    assert "train-stacked" in stacked_log.splitlines()[0]
    for name in pair:
        assert json.loads((profile / "runs" / name / "train.json").read_text())["stacked_with"] == [
            n for n in pair if n != name]

    assert "[test hook] epoch 2: sleeping" in stacked_log, stacked_log  # once, for the job of both runs
    assert "attempt 2" in stacked_log and "requeued with --resume" in stacked_log, stacked_log
    assert all(f"resuming {name} after epoch 1" in stacked_log for name in pair), stacked_log
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", entry["job_id"].split("_")[0]],
                             env=job_env, capture_output=True, text=True).stdout
    assert "REQUEUED" in history, history

    assert set(metrics_of(profile)) == {f"{name}.json" for name in pair}
    assert metrics_of(profile) == metrics_of(local / PROFILE)
    for name in pair:
        ours, theirs = RunPaths(profile / "runs" / name), RunPaths(local / PROFILE / "runs" / name)
        assert same_weights(ours.deployed, theirs.deployed), name
        # The selected model may be epoch 1's, trained before the requeue: epoch 2, trained after it, is checked in the
        # state it left (weights, batch-norm statistics, momentum) and in its numbers.
        assert same_weights(ours.state, theirs.state), name
        assert history_of(ours) == history_of(theirs), name
    assert stage_status(profile, env) == {"verify", "report"}  # train@ and evaluate@ of both are in dvc.lock


def history_of(run: RunPaths) -> list[dict]:
    """A run's per-epoch numbers from train.json, without its timings."""
    keys = ("epoch", "lr", "train_loss", "train_acc", "val_natural_acc", "val_pgd_acc")
    return [{k: h.get(k) for k in keys} for h in json.loads(run.summary.read_text())["history"]]
