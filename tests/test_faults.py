"""Fault injection (issue 17): trainings killed with SIGKILL at chosen points (runtime.fault, through the
PAPER_REPRO_FAULT environment variable) resume to the bit-exact result of an uninterrupted run; two
trainings of one run folder; stale locks; the run folder is one run's or marked INCOMPLETE; file modes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import paper_repro
from paper_repro import atomic, checkpoint, config, evaluate, runtime, train as train_mod
from paper_repro.runtime import RunLock, RunPaths

RUN = "en1resnet8-ternary-br-tradeoff"  # BR phases, model noise, the trade-off loss: every random stream
SMALL = "resnet8-fp-natural"
TRAIN = {"epochs": 3, "batch_size": 50, "milestones": [2], "relax": {"hard_epoch": 1}, "pgd": {"steps": 1},
         "val_attack": {"steps": 1}, "val_examples": 20}
EXPERIMENTS = [{"name": RUN, "model": "en1resnet8", "quantizer": "ternary", "method": "BR", "loss": "tradeoff"},
               {"name": SMALL, "model": "resnet8", "loss": "natural"}]
TIMING = ("images_per_s", "epoch_s")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from archive_factory import make_archive
    from paper_repro.data import prepare

    root = tmp_path_factory.mktemp("faults")
    prepare(str(make_archive(root / "cifar-10-python.tar.gz")), root / "prepared")
    raw = {"profile": "test", "data": {"prepared": str(root / "prepared"), "expect_counts": None, "val_size": 30},
           "train": TRAIN, "experiments": EXPERIMENTS}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root


def command(root: Path, name: str, *extra: str, experiment: str = RUN) -> list[str]:
    return [sys.executable, "-m", "paper_repro", "train", "--params", str(root / "params.yaml"), "-e", experiment,
            "--quiet", "--run-dir", str(root / name), "--live-dir", str(root / f"live-{name}"), *extra]


def environment(fault: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(runtime.FAULT_ENV)}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CI="1",
               PYTHONPATH=str(Path(paper_repro.__file__).resolve().parents[1]), **extra)
    if fault:
        env[runtime.FAULT_ENV] = fault
    return env


def train(root: Path, name: str, *extra: str, fault: str | None = None, experiment: str = RUN
          ) -> subprocess.CompletedProcess:
    return subprocess.run(command(root, name, *extra, experiment=experiment), capture_output=True, text=True,
                          env=environment(fault), timeout=600)


@pytest.fixture(scope="module")
def straight(project) -> Path:
    proc = train(project, "straight")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return project / "straight"


def assert_same_run(a: Path, b: Path) -> None:
    for which in ("state", "deployed", "float_weights"):
        ta, _ = checkpoint.load(getattr(RunPaths(a), which))
        tb, _ = checkpoint.load(getattr(RunPaths(b), which))
        assert sorted(ta) == sorted(tb), which
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differ, f"{which}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    sa, sb = (json.loads(RunPaths(p).summary.read_text()) for p in (a, b))
    strip = [[{k: v for k, v in h.items() if k not in TIMING} for h in s["history"]] for s in (sa, sb)]
    assert strip[0] == strip[1] and sa["selected"] == sb["selected"]


def leftovers(*folders: Path) -> list[Path]:
    return [p for f in folders for p in f.rglob("*") if p.name.startswith(".")
            or p.name in ("INCOMPLETE", "train.lock")]


# --------------------------------------------------------------------------- kills at injected points
CHAINS = {  # kill points, one per call, each call resuming the previous one; then a last call finishes
    "staged-deployed-summary": ["state-staged:1", "deployed-weights:2", "summary:3"],
    "tmp-weights-after_state": ["state-weights-tmp:1", "state-weights:2", "after-state:3"],
    "log-float-committed": ["after-log:1", "float-committed:2", "state-committed:3"],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_resume_after_kills_is_bit_exact(project, straight, chain):
    """Items 2, 6 and the Done-when: every kill leaves a folder that --resume finishes exactly as an
    uninterrupted run, with no temporary files, a DVCLive log whose steps continue, and no marker left."""
    name = f"killed-{chain}"
    paths = RunPaths(project / name)
    said = ""
    for i, point in enumerate(CHAINS[chain]):
        proc = train(project, name, *(["--resume"] if i else []), fault=point)
        said += proc.stdout
        assert proc.returncode == -9, (point, proc.stdout + proc.stderr)  # SIGKILL at the point, not before
        assert paths.incomplete.is_file()  # the folder says it holds no finished run
        if point == "state-weights:2":  # item 2: the state's weights are new, its sidecar old
            with pytest.raises(checkpoint.CheckpointError, match="interrupted"):
                checkpoint.load(paths.state)
        if point == "state-weights-tmp:1":  # a half-done write left a temp file inside the DVC output
            assert list(paths.state.parent.glob(atomic.TEMP_GLOB))
    with pytest.raises(config.ConfigError, match="no finished training"):
        evaluate.load_run(paths.root, torch.device("cpu"))
    proc = train(project, name, "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said += proc.stdout
    assert "taking over the stale lock" in said  # every kill left its lock behind
    if any(p.split(":")[0].endswith(("-weights", "-committed")) for p in CHAINS[chain]):
        assert "completed the interrupted save" in said
    if "state-weights-tmp:1" in CHAINS[chain]:
        assert "temporary file(s) of interrupted writes" in said
    assert_same_run(straight, paths.root)
    assert leftovers(paths.root, project / f"live-{name}") == []
    rows = (project / f"live-{name}" / "plots" / "metrics" / "val_pgd_acc.tsv").read_text().splitlines()
    steps = [int(r.split("\t")[0]) for r in rows[1:]]
    assert steps == [0, 1, 2], rows  # item 6: the steps continue after a resume (no restart at 0, no gap)
    assert json.loads((project / f"live-{name}" / "metrics.json").read_text())["step"] == 2


def test_resume_with_an_unreadable_state_explains(project, tmp_path):
    """Item 2: a state that cannot be recovered gives a one-line error naming --restart, not a traceback."""
    name = "broken"
    assert train(project, name, fault="epoch-start:2").returncode == -9
    state = RunPaths(project / name).state
    state.write_bytes(state.read_bytes()[:-7])
    proc = train(project, name, "--resume")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot resume" in proc.stderr and "--restart" in proc.stderr
    proc = train(project, name, "--resume", "--restart", "--set", "train.epochs=1")
    assert proc.returncode == 0 and "cannot be read" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- two trainings of one folder
def test_second_concurrent_training_fails_naming_the_holder(project, tmp_path):
    """Item 5: while one training holds the folder a second one fails at once with one line naming the
    holder's pid and host; the first finishes unaffected, its log not interleaved."""
    name = "concurrent"
    release = tmp_path / "release"
    first = subprocess.Popen(command(project, name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=environment("epoch-start:2:pause", PAPER_REPRO_FAULT_RELEASE=str(release)))
    try:
        lock = RunPaths(project / name).lock
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (project / name / "state" / "last.json").is_file():
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = train(project, name, "--resume")
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
    finally:
        release.touch()
        out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    paths = RunPaths(project / name)
    selected = json.loads(paths.summary.read_text())["selected"]
    assert checkpoint.read_sidecar(paths.deployed)["selected"] == selected
    rows = (project / f"live-{name}" / "plots" / "metrics" / "val_pgd_acc.tsv").read_text().splitlines()
    assert [int(r.split("\t")[0]) for r in rows[1:]] == [0, 1, 2]
    assert not paths.lock.exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def small_settings(project: Path, **train: object) -> config.Settings:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"] = {**raw["train"], "epochs": 1, "milestones": [], "relax": {"hard_epoch": 0}, **train}
    return config.from_dict(raw)


def test_stale_lock_is_taken_over(project, tmp_path, capsys):
    """Item 5: the lock of a killed training is taken over, saying whose it was."""
    settings = small_settings(project)
    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    pid = dead_pid()
    paths.lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    train_mod.train(settings, settings.experiment(SMALL), paths.root, quiet=True, live_dir=tmp_path / "live")
    assert f"taking over the stale lock {paths.lock} (pid {pid}" in capsys.readouterr().out
    assert not paths.lock.exists()


def test_exclusive_create_fallback_knows_live_and_dead_holders(tmp_path):
    """Item 5, where flock is unavailable: an O_EXCL lock file of a live pid holds, of a dead pid is stale."""
    lock = tmp_path / "train.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(runtime.RunLocked, match=f"pid {os.getppid()} on host"):
        RunLock(lock)._acquire_excl()
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "then"}))
    held = RunLock(lock)._acquire_excl()
    assert "stale" in held.took_over and json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


# --------------------------------------------------------------------------- the run folder
def test_diverged_fresh_retrain_leaves_no_previous_model(project, tmp_path):
    """Item 4: a fresh retrain removes the previous run's files before training; if it diverges the folder
    is marked INCOMPLETE and evaluate refuses it instead of using the old model."""
    good = small_settings(project)
    paths = RunPaths(tmp_path / "run")
    train_mod.train(good, good.experiment(SMALL), paths.root, quiet=True, live_dir=tmp_path / "live")
    assert not paths.incomplete.exists()
    evaluate.load_run(paths.root, torch.device("cpu"))  # a finished run loads
    bad = small_settings(project, lr=1e6)
    with pytest.raises(train_mod.TrainingDiverged, match="nothing is saved"):
        train_mod.train(bad, bad.experiment(SMALL), paths.root, quiet=True, live_dir=tmp_path / "live")
    assert paths.incomplete.is_file()
    assert not any(p.exists() for p in (paths.deployed, paths.float_weights, paths.summary, paths.state))
    with pytest.raises(config.ConfigError, match="no finished training"):
        evaluate.load_run(paths.root, torch.device("cpu"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_of_a_new_file(tmp_path, umask):
    """Item 6: written files get 0666 & ~umask (mkstemp alone would make them 0600)."""
    old = os.umask(umask)
    try:
        paths = [atomic.write_text(tmp_path / "a.json", "{}"),
                 checkpoint.save(tmp_path / "c.safetensors", {"w": torch.zeros(2)}, {"v": 1})]
        paths.append(checkpoint.sidecar_path(paths[1]))
        lock = RunLock(tmp_path / "train.lock").acquire()
        paths.append(lock.path)
        modes = {p.name: p.stat().st_mode & 0o777 for p in paths}
        lock.release()
    finally:
        os.umask(old)
    assert modes == {p.name: 0o666 & ~umask for p in paths}


# --------------------------------------------------------------------------- a full disk (a real small tmpfs)
@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only: elsewhere the test skips, saying why); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_training_on_a_full_disk_stops_in_one_line_and_resumes_once_there_is_room(project, small_disk):
    """ENOSPC while saving a checkpoint: exit 2 with `error: disk full writing ...`, no half-written file,
    the folder marked INCOMPLETE; after the disk grows, --resume finishes the run."""
    base = [sys.executable, "-m", "paper_repro", "train", "--params", str(project / "params.yaml"), "-e", SMALL,
            "--quiet", "--run-dir", str(small_disk / "run"), "--live-dir", str(small_disk / "live")]
    proc = subprocess.run(base, capture_output=True, text=True, env=environment(), timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk full writing "), proc.stderr[-2000:]
    assert not [p for p in small_disk.rglob("*") if ".tmp" in p.name], "a temp file was left behind"
    assert (small_disk / "run" / "INCOMPLETE").is_file() and not (small_disk / "run" / "train.json").exists()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = subprocess.run([*base, "--resume"], capture_output=True, text=True, env=environment(), timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert (small_disk / "run" / "train.json").is_file() and not (small_disk / "run" / "INCOMPLETE").exists()
