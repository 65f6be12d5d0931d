"""The Slurm executor of ``grid``: the same stage commands as the local executor, as Slurm job arrays
through submitit, in the shared workspace.

Why this shape:
- One array of trainings, then one array of evaluations that starts only when every training
  succeeded (``afterok``), because a quantized run's evaluation reads its float twin. Both are
  submitted at once, so ``--no-wait`` works; ``--kill-on-invalid-dep`` cancels the evaluations
  when a training fails instead of leaving them pending forever.
- A job that reaches its time limit, or is preempted, gets SIGUSR2 ``signal_delay_s`` seconds
  early; submitit then calls :meth:`StageJob.checkpoint`, which stops the command cleanly (SIGINT:
  training keeps its last finished epoch) and requeues it with ``--resume``.
- The submission is written to ``logs/grid/slurm/submitted.json`` so that ``grid --attach`` can
  follow it (and ``dvc commit`` the results) from another login session.
- A stacked training (``grid --stack K``: ``train-stacked``) is one job of the train array for up to K
  experiments, as with the local executor: its entry in the manifest names them all, and their train
  stages succeed (are committed) or fail together.

Kept whole (~470 lines): its settings, the requeueing job and submit/follow share SlurmSettings and the
manifest, and grid is its only user (this is the one module that imports submitit).
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import submitit
import yaml
from submitit.helpers import Checkpointable, DelayedSubmission

from .config import ConfigError

FOLDER = Path("logs") / "grid" / "slurm"
MANIFEST = FOLDER / "submitted.json"
# sbatch options grid sets itself -> the grid option to use instead (None: grid's own business).
MANAGED = {"array": "--array-parallelism", "output": None, "error": None, "open-mode": None,
           "signal": "--signal-delay-s", "dependency": None, "kill-on-invalid-dep": None, "time": "--time-min",
           "t": "--time-min", "partition": "--partition", "p": "--partition", "gpus-per-node": "--gpus",
           "gpus": "--gpus", "cpus-per-task": "--cpus", "c": "--cpus", "mem": "--mem-gb", "job-name": None,
           "J": None, "wrap": None, "requeue": None, "no-requeue": None}
PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED", "RESIZING", "SUSPENDED",
           "CONFIGURING", "UNKNOWN"}
RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SlurmSettings:
    """What the jobs ask Slurm for; from ``--slurm-config`` (YAML), overridden by the command line."""
    time_min: int
    partition: str | None = None
    gpus: int = 0
    cpus: int = 1
    mem_gb: float | None = None
    sbatch: dict[str, str] = field(default_factory=dict)
    array_parallelism: int = 256
    signal_delay_s: int = 90
    max_requeues: int = 3

    def executor_parameters(self, name: str) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters for one array."""
        params: dict[str, Any] = {"time": self.time_min, "cpus_per_task": self.cpus, "job_name": name,
                                  "array_parallelism": self.array_parallelism, "stderr_to_stdout": True,
                                  "signal_delay_s": self.signal_delay_s,
                                  "additional_parameters": dict(self.sbatch)}
        if self.partition:
            params["partition"] = self.partition
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.mem_gb is not None:
            params["mem"] = f"{max(1, round(self.mem_gb * 1024))}MB"
        return params


# Settings that a command line option (--time-min for time_min, ...) can set.
CLI_KEYS = ("partition", "time_min", "gpus", "cpus", "mem_gb", "array_parallelism", "signal_delay_s", "max_requeues")
MINIMUM = {"time_min": 1, "gpus": 0, "cpus": 1, "mem_gb": 0.001, "array_parallelism": 1, "signal_delay_s": 1,
           "max_requeues": 0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The Slurm options of ``grid`` (they apply to --executor slurm only)."""
    g = p.add_argument_group("Slurm (--executor slurm)")
    g.add_argument("--slurm-config", type=Path, metavar="YAML",
                   help="Slurm settings file (keys: " + ", ".join(f.name for f in fields(SlurmSettings)) + ")")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time-min", type=int, metavar="MIN", help="time limit of each job in minutes (required)")
    g.add_argument("--gpus", type=int, metavar="N", help="GPUs per job (default 0)")
    g.add_argument("--cpus", type=int, metavar="N", help="CPUs per job, also its thread count (default 1)")
    g.add_argument("--mem-gb", type=float, metavar="GB", help="memory per job (default: the partition's)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. --sbatch account=proj --sbatch qos=long (repeatable)")
    g.add_argument("--array-parallelism", type=int, metavar="N", help="jobs of one array running at once (default 256)")
    g.add_argument("--signal-delay-s", type=int, metavar="S",
                   help="checkpoint and requeue S seconds before the time limit (default 90)")
    g.add_argument("--max-requeues", type=int, metavar="N", help="requeues after time-outs per job (default 3)")
    g.add_argument("--no-wait", action="store_true", help="submit and return (follow later with --attach)")
    g.add_argument("--attach", action="store_true",
                   help=f"follow the last submission ({MANIFEST}) until it ends, then dvc commit")


def given_options(args: argparse.Namespace) -> list[str]:
    """The Slurm-only options set on the command line (to reject them with --executor local)."""
    names = [*CLI_KEYS, "slurm_config", "no_wait", "attach"]
    given = [n for n in names if getattr(args, n, None) is not None and getattr(args, n) is not False]
    return ["--" + n.replace("_", "-") for n in given] + (["--sbatch"] if getattr(args, "sbatch", None) else [])


def parse_sbatch(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings -> {key: value}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--sbatch {item!r}: expected KEY=VALUE, e.g. --sbatch account=myproject")
        out[key.strip()] = value.strip()
    return out


def read_config(path: Path) -> dict[str, Any]:
    """The mapping of a ``--slurm-config`` YAML file."""
    if not path.is_file():
        raise ConfigError(f"--slurm-config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--slurm-config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--slurm-config {path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(SlurmSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"--slurm-config {path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    return data


def check_sbatch(options: Any, source: str) -> dict[str, str]:
    """Extra sbatch options: a mapping of option names (no leading dashes) to scalar values."""
    if not isinstance(options, dict):
        raise ConfigError(f"{source}: sbatch must be a mapping of option: value, got {type(options).__name__}")
    out = {}
    for key, value in options.items():
        name = str(key).strip().lstrip("-").replace("_", "-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
            raise ConfigError(f"{source}: sbatch option {key!r} is not an sbatch option name")
        if name in MANAGED:
            instead = f"; use {MANAGED[name]} instead" if MANAGED[name] else ""
            raise ConfigError(f"{source}: sbatch option {name!r} is set by grid{instead}")
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{source}: sbatch option {name!r} needs a single value, got {value!r}")
        out[name] = value if isinstance(value, bool) else str(value)
    return out


def check_number(name: str, value: Any, kind: type, minimum: float, source: str) -> Any:
    """One numeric setting, with the key named in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ConfigError(f"{source}: {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{source}: {name} must be >= {minimum}, got {value}")
    return kind(value)


def settings_from(args: argparse.Namespace) -> SlurmSettings:
    """Merge ``--slurm-config`` and the command line (which wins) into validated settings; an error
    names where the bad value came from."""
    values = read_config(args.slurm_config) if args.slurm_config else {}
    origin = {key: f"--slurm-config {args.slurm_config}" for key in values}
    sbatch = check_sbatch(values.get("sbatch", {}), origin.get("sbatch", ""))
    for key in CLI_KEYS:
        if getattr(args, key, None) is not None:
            values[key], origin[key] = getattr(args, key), "grid --" + key.replace("_", "-")
    sbatch.update(check_sbatch(parse_sbatch(args.sbatch), "grid --sbatch"))
    values["sbatch"] = sbatch
    if values.get("time_min") is None:
        raise ConfigError("--executor slurm needs a time limit: --time-min MINUTES (or time_min: in --slurm-config)")
    for key, minimum in MINIMUM.items():
        if values.get(key) is not None:
            values[key] = check_number(key, values[key], float if key == "mem_gb" else int, minimum, origin[key])
    if values.get("partition") is not None:
        values["partition"] = str(values["partition"]).strip()
        if not values["partition"]:
            raise ConfigError(f"{origin['partition']}: partition must not be empty")
    settings = SlurmSettings(**values)
    if settings.time_min * 60 < settings.signal_delay_s + 60:
        raise ConfigError(f"--time-min {settings.time_min} leaves no time before the requeue signal: Slurm signals "
                          f"up to ~30 s earlier than --signal-delay-s ({settings.signal_delay_s} s) and the job "
                          f"needs ~30 s to start; raise --time-min or lower --signal-delay-s")
    return settings


# --------------------------------------------------------------------------- the job
class StageFailed(RuntimeError):
    """A stage command exited non-zero (the job is then FAILED in Slurm)."""


def ignore_usr2() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Slurm signals every process of the job step; only submitit (the parent) should react to it. SIGINT
    gets its default back: a parent started in the background by a shell ignores it, the child would inherit
    that, and then the interrupt that stops training cleanly (stop()) would have no effect."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def slurm_job_id() -> str:
    """This job's id as squeue and sacct show it (ARRAY_TASK for an array task)."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "?")


TRAINING = {"train", "train-stacked"}  # the stage commands that --resume continues


def with_resume(argv: Sequence[str]) -> list[str]:
    """The command to run again after a requeue: training (stacked or not) continues from its last finished epoch."""
    argv = list(argv)
    if TRAINING & set(argv) and "--resume" not in argv:
        argv.append("--resume")
    return argv


class StageJob(Checkpointable):
    """One stage command (``python -m paper_repro train|train-stacked|evaluate ...``) as a Slurm job.

    Its output goes to ``log`` (the local executor's log file); a requeued attempt appends to it.
    ``grace_s``: how long the interrupted command may take to exit before it is killed (it must fit
    in the signal delay, or Slurm kills the job before submitit has requeued it).
    """

    def __init__(self, argv: Sequence[str], workdir: str | Path, log: str | Path, grace_s: float = 30) -> None:
        self.argv = list(argv)
        self.workdir = str(workdir)
        self.log = str(log)
        self.grace_s = grace_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        """A running process cannot travel in the requeue pickle."""
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _proc=None)

    def environment(self) -> dict[str, str]:
        """The job's own CPUs as the command's threads (torch would otherwise use every core of the node)."""
        threads = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def __call__(self) -> int:
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) + 1
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a" if attempt > 1 else "w") as out:
            out.write(f"$ {' '.join(self.argv)}\n# slurm job {slurm_job_id()} on {socket.gethostname()}, "
                      f"attempt {attempt}\n")
            out.flush()
            self._proc = subprocess.Popen(self.argv, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT,
                                          env=self.environment(), preexec_fn=ignore_usr2)
            # poll() rather than wait(): wait() holds a lock that checkpoint(), run from the signal
            # handler in this same thread, would need.
            while (code := self._proc.poll()) is None:
                time.sleep(0.5)
        if code != 0:
            raise StageFailed(f"{' '.join(self.argv[2:5])} exited with {code}: see {self.log}")
        return code

    def stop(self) -> int | None:
        """Interrupt the command (SIGINT: training saves nothing half-done and keeps its last finished
        epoch); kill it if it has not exited after ``grace_s``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return proc.returncode
            time.sleep(0.2)
        proc.kill()
        return None

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit on SIGUSR2 (time limit near, or preemption): stop, then requeue with --resume."""
        code = self.stop()
        with open(self.log, "a") as out:
            out.write(f"# time limit or preemption: stopped (exit {code}); requeued with --resume\n")
        return DelayedSubmission(StageJob(with_resume(self.argv), self.workdir, self.log, self.grace_s))


# --------------------------------------------------------------------------- submit and follow
@dataclass
class Entry:
    """One submitted job: what runs (a stacked training covers several experiments), its Slurm job id and its
    logs. ``stacked_with`` defaults to none, so manifests written before ``--stack`` ran on Slurm still load."""
    stage: str
    experiment: str
    job_id: str
    log: str
    slurm_log: str
    stacked_with: list[str] = field(default_factory=list)

    @property
    def experiments(self) -> tuple[str, ...]:
        return (self.experiment, *self.stacked_with)

    @property
    def dvc_stages(self) -> list[str]:
        """The DVC stages this job makes: each is done when the job succeeded, failed when it failed."""
        return [f"{self.stage}@{e}" for e in self.experiments]

    @property
    def dvc_stage(self) -> str:
        """The job's name in progress lines (``train@a + train@b`` for a stacked training)."""
        return " + ".join(self.dvc_stages)


def require_slurm() -> None:
    """Fail in one line where there is no Slurm client (e.g. not on a login node)."""
    missing = [c for c in ("sbatch", "srun", "sacct", "squeue") if shutil.which(c) is None]
    if missing:
        raise ConfigError(f"--executor slurm: {', '.join(missing)} not found on PATH: run grid on a Slurm "
                          f"login node (sacct needs Slurm accounting)")


def submit_array(settings: SlurmSettings, folder: Path, name: str, jobs: Sequence[Any], argv: Any,
                 workdir: Path, after: str | None) -> list[Entry]:
    """Submit ``jobs`` as one Slurm array (a single job when there is one); ``after``: an array id
    whose every task must succeed first."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
    params = settings.executor_parameters(name)
    if after:
        params["dependency"] = f"afterok:{after}"
        params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
    executor.update_parameters(**params)
    grace_s = max(5, settings.signal_delay_s // 3)
    stage_jobs = [StageJob(argv(job), workdir, workdir / job.log, grace_s) for job in jobs]
    with executor.batch():
        submitted = [executor.submit(sj) for sj in stage_jobs]
    return [Entry(job.stage, job.experiment, s.job_id, str(workdir / job.log), str(s.paths.stdout),
                  list(job.stacked_with)) for job, s in zip(jobs, submitted)]


def array_id(entries: Sequence[Entry]) -> str:
    return entries[0].job_id.split("_")[0]


def submit(phases: Sequence[Sequence[Any]], argv: Any, settings: SlurmSettings, workdir: Path,
           commit: bool) -> dict[str, Any]:
    """Submit the train array, then the evaluate array after it; write and return the manifest."""
    folder = workdir / FOLDER
    entries: list[Entry] = []
    after = None
    for stage, jobs in zip(("train", "evaluate"), phases):
        if jobs:
            submitted = submit_array(settings, folder, f"{stage}-{workdir.name}", jobs, argv, workdir, after)
            after = array_id(submitted) if stage == "train" else after
            entries += submitted
    manifest = {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "workdir": str(workdir), "folder": str(folder),
                "commit": commit, "settings": asdict(settings), "jobs": [asdict(e) for e in entries]}
    (workdir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_manifest(workdir: Path) -> dict[str, Any]:
    """The last submission made from ``workdir``."""
    path = workdir / MANIFEST
    if not path.is_file():
        raise ConfigError(f"grid --attach: no submission to follow ({path} is missing): submit with "
                          f"--executor slurm first")
    return json.loads(path.read_text())


def entries_of(manifest: dict[str, Any]) -> list[Entry]:
    return [Entry(**e) for e in manifest["jobs"]]


def slurm_jobs(manifest: dict[str, Any]) -> dict[str, submitit.SlurmJob]:
    """submitit handles on the submitted jobs by Entry.dvc_stage (they share one sacct watcher)."""
    return {e.dvc_stage: submitit.SlurmJob(folder=manifest["folder"], job_id=e.job_id) for e in entries_of(manifest)}


def poll_states(jobs: dict[str, submitit.SlurmJob]) -> dict[str, str]:
    """One sacct call for all jobs; their states by the keys of ``jobs`` ("CANCELLED by 0" -> "CANCELLED")."""
    submitit.SlurmJob.watcher.update()
    return {name: (job.watcher.get_state(job.job_id, mode="cache").split() or ["UNKNOWN"])[0]
            for name, job in jobs.items()}


def category(state: str) -> str:
    """pending / running / done / failed, the four counts shown while following."""
    if state in PENDING:
        return "pending"
    if state in RUNNING:
        return "running"
    return "done" if state == "COMPLETED" else "failed"


def still_active(manifest: dict[str, Any]) -> list[str]:
    """Job ids of a previous submission that Slurm still has queued or running (squeue: it knows a job
    from the moment it is submitted, unlike accounting)."""
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"grid: squeue failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    queued = set(proc.stdout.split())
    return sorted(e.job_id for e in entries_of(manifest) if e.job_id in queued)


def poll_interval(elapsed: float) -> float:
    """Often at first (short jobs, tests), then every 30 s (sacct is a database query on the cluster)."""
    return min(30.0, 3.0 + elapsed / 10)


def follow(manifest: dict[str, Any], out=sys.stdout) -> dict[str, bool]:
    """Wait for the submitted jobs, printing counts when they change, each finished or failed job (with
    its logs) and each requeue; returns {dvc stage: succeeded}, every stage of a job getting its outcome."""
    entries = {e.dvc_stage: e for e in entries_of(manifest)}
    jobs = slurm_jobs(manifest)
    seen: dict[str, str] = {}
    counts_shown = None
    started = time.monotonic()
    while True:
        states = poll_states(jobs)
        for name, state in states.items():
            before, now = category(seen.get(name, "UNKNOWN")), category(state)
            if now != before or (state != seen.get(name) and now == "failed"):
                report_change(entries[name], jobs[name].job_id, seen.get(name), state, out)
            seen[name] = state
        counts = {c: sum(category(s) == c for s in states.values()) for c in ("pending", "running", "done", "failed")}
        if counts != counts_shown:
            print(f"grid: {len(states)} jobs: {counts['pending']} pending, {counts['running']} running, "
                  f"{counts['done']} done, {counts['failed']} failed", file=out, flush=True)
            counts_shown = counts
        if counts["pending"] == counts["running"] == 0:
            return {stage: category(state) == "done" for name, state in states.items()
                    for stage in entries[name].dvc_stages}
        time.sleep(poll_interval(time.monotonic() - started))


def report_change(entry: Entry, job_id: str, before: str | None, state: str, out) -> None:
    """One line per transition that matters to the user."""
    now = category(state)
    if now == "pending" and before is not None and category(before) == "running":
        print(f"grid: {entry.dvc_stage} (job {job_id}) requeued after a time limit or preemption: it resumes "
              f"from its last finished epoch", file=out, flush=True)
    elif now == "running":
        print(f"grid: {entry.dvc_stage} (job {job_id}) running", file=out, flush=True)
    elif now == "done":
        print(f"grid: {entry.dvc_stage} (job {job_id}) done", file=out, flush=True)
    elif now == "failed":
        why = "a training it depends on failed" if state == "CANCELLED" and entry.stage == "evaluate" else state
        print(f"grid: {entry.dvc_stage} (job {job_id}) FAILED ({why}): log {entry.log}, slurm log {entry.slurm_log}",
              file=out, flush=True)


def describe(manifest: dict[str, Any]) -> str:
    """The submitted arrays in one line per stage kind."""
    lines = []
    for stage in ("train", "evaluate"):
        entries = [e for e in entries_of(manifest) if e.stage == stage]
        if entries:
            lines.append(f"grid: submitted {len(entries)} {stage} job(s) as Slurm job {array_id(entries)}: "
                         + ", ".join(f"{e.job_id}={'+'.join(e.experiments)}" for e in entries))
    return "\n".join(lines)
