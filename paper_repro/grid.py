"""``grid``: run the train and evaluate commands of every experiment that is not up to date as
parallel jobs, then let DVC record their outputs, so ``dvc repro`` only runs what comes after
(verify, report, publish).

Why: ``dvc repro`` runs one stage at a time, and parallel ``dvc repro`` processes in one workspace
block each other on DVC's repository lock. Small CPU trainings also use two cores badly: two
single-threaded ResNet20 trainings side by side do about 1.3x the work of one two-threaded training
(measured on the 2-core machine). So the jobs run the very commands of dvc.yaml (``python -m
paper_repro train|evaluate -e NAME``), writing into ``runs/<name>/`` and ``metrics/<name>.json``
exactly as the stages do, and ``dvc commit`` then records them in dvc.lock. Training runs first for
all selected experiments, evaluation second: a quantized run's evaluation reads its float twin
(the transfer check), which is then always trained. ``--executor local`` runs the jobs as
subprocesses here, ``-j`` at a time, each with cores/j threads; ``--executor slurm`` submits them
as Slurm job arrays into the shared workspace (see paper_repro/slurm.py and docs/slurm.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from . import config
from .config import ConfigError, Experiment
from .stacking import members_in_one_pass, stacks

STAGES = ("train", "evaluate")
LOG_DIR = Path("logs") / "grid"


@dataclass(frozen=True)
class Job:
    stage: str
    experiment: str
    cost: float
    stacked_with: tuple[str, ...] = ()  # train only: the runs trained in one stacked network with ``experiment``
    one_pass: bool = False  # train only: an ensemble alone, its members trained as one grouped network

    @property
    def experiments(self) -> tuple[str, ...]:
        return (self.experiment, *self.stacked_with)

    @property
    def dvc_stage(self) -> str:
        return " + ".join(f"{self.stage}@{e}" for e in self.experiments)

    @property
    def dvc_stages(self) -> list[str]:
        return [f"{self.stage}@{e}" for e in self.experiments]

    @property
    def log(self) -> Path:
        more = f"+{len(self.stacked_with)}" if self.stacked_with else ""
        return LOG_DIR / f"{self.stage}-{self.experiment}{more}.log"


#: Forward MACs per image relative to ResNet20 (models/flops.count_macs: 41 M): WRN-34-10 6.3 G per 30 depth units
#: at widen 1 scaled by widen^2; VGG-11/13/16/19 on 32x32 inputs.
WRN_MACS_PER_WIDEN2 = 6.3e9 / 41e6 / 100
VGG_MACS = {11: 3.7, 13: 5.6, 16: 7.7, 19: 9.7}


def relative_cost(e: Experiment) -> float:
    """Rough training cost (ResNet20-image passes per image), to start the longest jobs first and balance
    workers: ensemble members x forward MACs x passes of the loss (PGD-10 AT: attack + update)."""
    passes = {"natural": 1.0, "pgd_at": 4.0, "tradeoff": 5.0, "trades": 5.0}[e.loss]
    resnet, wrn, vgg = (pattern.match(e.model) for pattern in (config.RESNET_NAME, config.WRN_NAME, config.VGG_NAME))
    if resnet is not None:
        size = int(resnet["k"] or 1) * int(resnet["depth"]) / 20
    elif wrn is not None:
        size = int(wrn["k"] or 1) * (int(wrn["depth"]) - 4) / 30 * int(wrn["widen"]) ** 2 * WRN_MACS_PER_WIDEN2
    else:
        size = VGG_MACS[int(vgg["depth"])] if vgg is not None else 1.0
    return size * passes


def outdated(stages: Sequence[str], dvc: str = "dvc") -> set[str] | None:
    """The stages among ``stages`` that `dvc status` reports as changed (None when DVC cannot tell,
    e.g. no dvc.yaml here: then every job runs)."""
    if not Path("dvc.yaml").is_file():
        return None
    proc = subprocess.run([dvc, "status", "--json", *stages], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        return None
    return {name.split(":")[-1] for name in status}


def plan(settings: config.Settings, only: Sequence[str] | None, force: bool, stack: int = 1) -> list[list[Job]]:
    """[train jobs, evaluate jobs], each sorted longest first; up-to-date stages are left out."""
    experiments = settings.experiments
    if only:
        known = {e.name for e in experiments}
        unknown = [n for n in only if n not in known]
        if unknown:
            raise ConfigError(f"grid --only: unknown experiment {unknown[0]!r}; params.yaml lists: "
                              f"{', '.join(sorted(known))}")
        experiments = [e for e in experiments if e.name in only]
    names = [f"{stage}@{e.name}" for stage in STAGES for e in experiments]
    changed = None if force else outdated(names)
    phases = []
    for stage in STAGES:
        due = [e for e in experiments if changed is None or f"{stage}@{e.name}" in changed
               or (stage == "evaluate" and f"train@{e.name}" in changed)]
        groups = stacks(settings, due, stack) if stage == "train" else [[e] for e in due]
        jobs = [Job(stage, group[0].name, sum(relative_cost(e) for e in group) * (1.0 if stage == "train" else 0.3),
                    tuple(e.name for e in group[1:]),
                    stage == "train" and stack > 1 and len(group) == 1 and members_in_one_pass(settings, group[0]))
                for group in groups]
        phases.append(sorted(jobs, key=lambda j: -j.cost))
    return phases


def command(job: Job, params: Path) -> list[str]:
    # the stage's own command (dvc.yaml): continue a run of the same settings, start over when they changed
    extra = ["--resume", "--restart"] if job.stage == "train" else []
    if job.stacked_with or job.one_pass:  # writes each run's folder as `train` does (paper_repro/train_stacked.py)
        named = [arg for e in job.experiments for arg in ("--experiment", e)]
        return [sys.executable, "-m", "paper_repro", "train-stacked", "--params", str(params), *named, "--quiet", *extra]
    return [sys.executable, "-m", "paper_repro", job.stage, "--params", str(params), "--experiment",
            job.experiment, "--quiet", *extra]


def run_local(jobs: Sequence[Job], params: Path, workers: int, threads: int, quiet: bool = False) -> dict[Job, int]:
    """Run ``jobs`` as subprocesses, ``workers`` at a time, each with ``threads`` CPU threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "CI": "true"}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    results: dict[Job, int] = {}

    def one(job: Job) -> int:
        with open(job.log, "w") as log:
            log.write(f"$ {' '.join(command(job, params))}\n")
            log.flush()
            return subprocess.run(command(job, params), stdout=log, stderr=subprocess.STDOUT, env=env).returncode

    pending = list(jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(jobs), desc="grid", unit="job",
                                                                disable=quiet) as bar:
        running: dict[Future, Job] = {}
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                running[pool.submit(one, job)] = job
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                results[job] = future.result()
                bar.update(1)
                state = "done" if results[job] == 0 else f"FAILED (exit {results[job]}, log {job.log})"
                tqdm.write(f"grid: {job.dvc_stage} {state}")
            failed = sum(1 for c in results.values() if c != 0)
            bar.set_postfix(running=len(running), done=len(results) - failed, failed=failed, queued=len(pending))
    return results


def commit(stages: Sequence[str], dvc: str = "dvc") -> None:
    """Record the jobs' outputs in dvc.lock, as if `dvc repro` had run those stages."""
    if stages and Path("dvc.yaml").is_file():
        subprocess.run([dvc, "commit", "--force", *stages], check=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("local", "slurm"), default="local",
                   help="where jobs run: local = subprocesses on this machine, slurm = Slurm job arrays "
                        "(run from a login node, in a workspace on a shared filesystem)")
    p.add_argument("-j", "--jobs", type=int, default=None,
                   help="local: jobs at once (default: number of cores, at most the number of jobs)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these experiments")
    p.add_argument("--force", action="store_true", help="run every selected job, up to date or not")
    p.add_argument("--no-commit", action="store_true", help="do not `dvc commit` the finished stages")
    p.add_argument("--stack", type=int, default=1, metavar="K",
                   help="train up to K runs that share a data pass (dataset, ResNet depth, loss kind) as one "
                        "stacked network per job (train-stacked; each run's folder as `train` writes it; on Slurm one "
                        "array job per stack; an En_k ensemble stacked with no other run still trains its k members as "
                        "one grouped network). Pays on a GPU: 8 stacked ResNet20s ran 4.15x the images/s of 8 one "
                        "after another on an H200")
    slurm_arguments(p)


def slurm_arguments(p: argparse.ArgumentParser) -> None:
    """The Slurm options, from paper_repro.slurm (imported only when submitit is installed)."""
    try:
        from . import slurm
    except ImportError:  # submitit missing: --executor slurm then says so in one line
        return
    slurm.add_arguments(p)


def check_executor_options(args: argparse.Namespace) -> None:
    """Options of one executor given to the other are mistakes, not no-ops."""
    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"grid -j must be >= 1, got {args.jobs}")
    if args.stack < 1:
        raise ConfigError(f"grid --stack must be >= 1, got {args.stack}")
    if args.executor == "slurm":
        if args.jobs is not None:
            raise ConfigError("grid -j is for --executor local; with slurm use --array-parallelism N")
        if not hasattr(args, "attach"):
            raise ConfigError("--executor slurm needs submitit: pip install -r requirements.lock")
    else:
        from .slurm import given_options
        given = given_options(args) if hasattr(args, "attach") else []
        if given:
            raise ConfigError(f"grid {given[0]} applies to --executor slurm only")


def main(args: argparse.Namespace) -> int:
    check_executor_options(args)
    if args.executor == "slurm" and args.attach:
        return finish_slurm(args, None)
    settings = config.load(args.params, args.overrides)
    if args.overrides:
        raise ConfigError("grid runs the stages as params.yaml defines them; --set would make the results "
                          "differ from what DVC records: edit params.yaml (or use dvc exp run -S) instead")
    if args.executor == "slurm":
        return main_slurm(args, settings)
    cores = os.cpu_count() or 1
    phases = plan(settings, args.only, args.force, args.stack)
    n_jobs = sum(len(p) for p in phases)
    if not n_jobs:
        print("grid: every selected experiment is up to date")
        return 0
    workers = max(1, min(args.jobs or cores, max(len(p) for p in phases)))
    threads = max(1, cores // workers)
    print(f"grid: {n_jobs} jobs ({len(phases[0])} train, {len(phases[1])} evaluate), {workers} at once, "
          f"{threads} thread(s) each; logs in {LOG_DIR}/", flush=True)
    started = time.perf_counter()
    failed: list[Job] = []
    for jobs in phases:
        lost = {e for f in failed for e in f.experiments}
        results = run_local([j for j in jobs if not lost & set(j.experiments)], args.params, workers, threads,
                            args.quiet)
        failed += [j for j, code in results.items() if code != 0]
        ok = [stage for j, code in results.items() if code == 0 for stage in j.dvc_stages]
        if not args.no_commit:
            commit(ok)
    print(f"grid: finished in {time.perf_counter() - started:.0f} s; {len(failed)} failed", flush=True)
    for job in failed:
        print(f"grid: {job.dvc_stage} failed: see {job.log}", file=sys.stderr)
    return 1 if failed else 0


def follow_up(args: argparse.Namespace) -> str:
    """The command that follows a --no-wait submission to its end (and records it in dvc.lock)."""
    params = [] if args.params == Path("params.yaml") else ["--params", str(args.params)]
    return " ".join(["python -m paper_repro grid --executor slurm --attach", *params,
                     *(["--no-commit"] if args.no_commit else [])])


def main_slurm(args: argparse.Namespace, settings: config.Settings) -> int:
    """Plan, submit the train and evaluate arrays, then follow them (unless --no-wait)."""
    from . import slurm
    slurm_settings = slurm.settings_from(args)
    slurm.require_slurm()
    workdir = Path.cwd().resolve()
    if (workdir / slurm.MANIFEST).is_file():
        active = slurm.still_active(slurm.load_manifest(workdir))
        if active:
            raise ConfigError(f"grid: jobs of the previous submission are still queued or running "
                              f"({', '.join(active)}): follow them with `{follow_up(args)}` or scancel them")
    phases = plan(settings, args.only, args.force, args.stack)
    if not any(phases):
        print("grid: every selected experiment is up to date")
        return 0
    params = args.params.resolve()
    manifest = slurm.submit(phases, lambda job: command(job, params), slurm_settings, workdir, not args.no_commit)
    print(slurm.describe(manifest), flush=True)
    print(f"grid: job logs in {LOG_DIR}/ (command output) and {slurm.FOLDER}/ (Slurm)", flush=True)
    if args.no_wait:
        print(f"grid: not waiting. Watch with `squeue --me`; when the jobs have ended, record their results "
              f"with: {follow_up(args)}", flush=True)
        return 0
    return finish_slurm(args, manifest)


def finish_slurm(args: argparse.Namespace, manifest: dict | None) -> int:
    """Follow a submission to its end, then `dvc commit` the stages whose jobs succeeded (every train stage of a
    stacked training that succeeded; none of one that failed), as the local executor does."""
    from . import slurm
    slurm.require_slurm()
    workdir = Path.cwd().resolve()
    manifest = manifest or slurm.load_manifest(workdir)
    if Path(manifest["workdir"]) != workdir:
        raise ConfigError(f"grid --attach: the last submission ran in {manifest['workdir']}: run this there")
    started = time.perf_counter()
    try:
        outcome = slurm.follow(manifest)
    except KeyboardInterrupt:
        print(f"\ngrid: stopped following; the jobs go on. Follow them again with: {follow_up(args)}",
              file=sys.stderr)
        return 130
    ok = [stage for stage, succeeded in outcome.items() if succeeded]
    entries = slurm.entries_of(manifest)
    failed = [e for e in entries if not all(outcome[stage] for stage in e.dvc_stages)]
    record = ok and manifest["commit"] and not args.no_commit
    if record:
        commit(ok)
    print(f"grid: the jobs ended after {time.perf_counter() - started:.0f} s of waiting; {len(entries) - len(failed)} "
          f"done, {len(failed)} failed{'; dvc.lock records the done stages' if record else ''}", flush=True)
    for entry in failed:
        print(f"grid: {entry.dvc_stage} failed: see {entry.log} and {entry.slurm_log}", file=sys.stderr)
    return 1 if failed else 0
