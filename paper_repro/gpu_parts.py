"""The parts of ``gpu-check`` (paper_repro/gpu_check.py), each run in its own process under its own timeout.

Every part writes ``<out>/parts/<part>.json`` as it goes (``Part.save``), so a part killed at its timeout
still reports what it measured. ``dry`` runs the same code tiny and on the CPU (synthetic data, one or two
steps), which is how CI tests the check without a GPU. Kept whole (~480 lines): one function per part, run by name
in a child process (``gpu-check --part NAME``), with the helpers only they use.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import platform
import re
import resource
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from . import __version__, atomic, config

ROOT = Path(__file__).resolve().parents[1]
GPU_PARAMS = ROOT / "profiles" / "gpu" / "params.yaml"
CUDA_TEST_MARKERS = ("cuda.is_available()",)
NOISY_MODEL = "en1resnet20"  # the paper columns are timed on a noisy model (the paper's EnResNets)
DRY_TRAIN = ["train.batch_size=50", "train.pgd.steps=2", "train.val_attack.steps=2", "train.val_examples=20",
             "data.val_size=30", "train.device=cpu", "evaluate.device=cpu"]


@dataclass
class Part:
    """One part's context: where it writes, how big it runs, and its own time limit."""
    name: str
    out: Path
    dry: bool
    timeout_s: float
    params: Path
    archive: str | None = None
    train_experiments: int = 2
    train_epochs: int = 3

    def __post_init__(self) -> None:
        self.result: dict[str, Any] = {}
        self.started = time.monotonic()

    def save(self, **fields: Any) -> None:
        """Merge ``fields`` into the result and write it now (a later timeout keeps what is saved)."""
        self.result.update(fields)
        atomic.write_json(self.out / "parts" / f"{self.name}.json", self.result, indent=1, default=str)

    def remaining(self) -> float:
        return self.timeout_s - (time.monotonic() - self.started)

    @property
    def prepared(self) -> Path:
        return self.out / "data" / "prepared"

    def settings(self, *overrides: str) -> config.Settings:
        """The profile's settings on the prepared data; dry: tiny sizes, CPU, depth-8 twins of the first models."""
        base = [f"data.prepared={self.prepared}", "data.expect_counts=null"]
        if not self.dry:
            return config.load(self.params, [*base, *overrides])
        first = config.load(self.params, base).experiments[:self.train_experiments]
        tiny = [f"experiments.{e.name}.model={dry_model(e.model)}" for e in first]
        return config.load(self.params, [*base, *DRY_TRAIN, *tiny, *overrides])


def dry_model(model: str) -> str:
    """The depth-8 twin of a model (en1resnet20 -> en1resnet8): the same code paths, a fraction of the work."""
    return re.sub(r"resnet[0-9]+$", "resnet8", model)


# --------------------------------------------------------------------------- env
def part_env(part: Part) -> None:
    """Versions and the device: what every figure of the report is measured on."""
    import torch
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "paper_repro": __version__, "torch": torch.__version__, "cuda_build": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
                            "git_commit": git_commit()}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover - torchvision is a dependency
        info["torchvision"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(), driver=_nvidia_smi("driver_version"))
    else:
        info.update(device=f"cpu ({os.cpu_count()} cores)", gpu_count=0)
    part.save(**info)


def git_commit() -> str | None:
    """HEAD, with "-dirty" when tracked files differ from it (a working tree copied beside an older .git, as on the
    project's GPU machines, reads as its .git's commit plus "-dirty", not as that commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        return f"{head}-dirty" if head and git("status", "--porcelain", "--untracked-files=no") else (head or None)
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- CUDA-only tests
def cuda_test_files(tests: Path = ROOT / "tests") -> list[Path]:
    """Test files holding GPU-only tests (tests/conftest.py marks them `cuda`)."""
    return sorted(p for p in tests.glob("test_*.py") if any(m in p.read_text() for m in CUDA_TEST_MARKERS))


def part_cuda_tests(part: Part) -> None:
    """``pytest -m cuda`` on the files with GPU-only tests; on a CPU they are all skipped (and said so)."""
    files = cuda_test_files()
    junit = part.out / "parts" / "cuda_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
           f"--junitxml={junit}", *(str(f.relative_to(ROOT)) for f in files)]  # cwd is ROOT
    part.save(command=" ".join(cmd[1:]), files=[str(f.relative_to(ROOT)) for f in files])
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    print(proc.stdout[-5000:], proc.stderr[-2000:], sep="\n")
    part.save(returncode=proc.returncode, **junit_counts(junit))
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise SystemExit(f"CUDA tests failed (pytest exit {proc.returncode})")


def junit_counts(path: Path) -> dict[str, Any]:
    """Counts and the names of failed/skipped tests from pytest's JUnit XML."""
    if not path.is_file():
        return {"collected": 0}
    cases = ET.parse(path).getroot().iter("testcase")
    failed, skipped, passed = [], [], []
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')}")
        else:
            passed.append(name)
    return {"collected": len(failed) + len(skipped) + len(passed), "passed": len(passed), "failed": failed,
            "skipped": skipped}


# --------------------------------------------------------------------------- bench
#: (model, step kind, torch.compile mode, whole-step CUDA graph, K: None for ours vs the baseline, else K models
#: stacked vs one after another), most wanted first: a part cut short by its timeout keeps the rows it finished.
#: The issue's target (a ResNet20 PGD-10 step, 10x) comes first, then the step with torch.compile's fused kernels
#: inside the graph (it compiles during warm-up, which takes long; 4.82x on the first H200 check, when the attack's
#: compiled backward still computed every weight gradient), then the stacked network (3x at K = 8), then
#: an En5ResNet20's five members in one pass (K = 1: the stacked network of one ensemble) against its member loop.
#: A row measured again by a later entry keeps its first measurement. torch.compile reduce-overhead was measured
#: on the first H200 run (4.23x; `bench --compile reduce-overhead`).
BENCH_PLAN = (("resnet20", "pgd_at", None, True, None), ("resnet20", "pgd_at", "default", True, None),
              ("resnet20", "pgd_at", None, True, 8), ("en5resnet20", "pgd_at", None, True, 1),
              ("en5resnet20", "pgd_at", None, True, None), ("resnet20", "clean", None, True, None),
              ("resnet20", "pgd_at", None, False, 4))
#: Steps of each single-model row's loops run again under torch.profiler (step_profile): where the time goes.
PROFILE_STEPS = 3
DRY_BENCH_PLAN = (("resnet8", "pgd_at", None, False, None), ("resnet8", "pgd_at", None, False, 2),
                  ("en2resnet8", "pgd_at", None, False, 1))  # no CUDA graphs on a CPU


def part_bench(part: Part) -> None:
    """Ours versus the plain baseline, repeated and interleaved (bench.py), with the whole step as one CUDA graph
    and under torch.compile as further loops, and K stacked versus sequential (``BENCH_PLAN``)."""
    from . import bench
    from .loader import pick_device
    settings = part.settings("train.pgd.steps=2") if part.dry else part.settings()
    device = pick_device("cpu" if part.dry else "auto")
    if part.dry:
        plan, size = DRY_BENCH_PLAN, dict(batch=16, warmup=2, timed=1, repeats=2)
    else:  # 5 warm-up steps cover compiling and graph capture
        plan, size = BENCH_PLAN, dict(batch=128, warmup=5, timed=10, repeats=5)
    n_images = size["batch"] * (size["warmup"] + size["timed"] * size["repeats"] + 1)
    part.save(environment=bench.environment(device), setup={**size, "pgd_steps": settings.train.pgd.steps},
              results={})
    results: dict[str, Any] = {}
    failed: list[dict[str, str]] = []
    for name, kind, compile_mode, graph, k in plan:
        try:
            rows = bench.run(settings, () if k else (name,), () if k else (kind,), size["batch"], size["warmup"],
                             size["timed"], n_images, device, repeats=size["repeats"], stacked=(k,) if k else (),
                             stacked_model=name, compile_mode=compile_mode, graph=graph,
                             profile=0 if k else PROFILE_STEPS)
        except Exception as e:  # one failing loop set (e.g. a new compile + graph combination) spares the others
            failed.append({"row": f"{kind} {name}{f' x{k} stacked' if k else ''}, compile {compile_mode}, "
                                  f"cuda graph {graph}",
                           "error": f"{type(e).__name__}: {e}"[:2000]})
            part.save(failed_rows=failed)
            continue
        for key, row in rows.items():
            if key not in results:
                results[key] = row
            elif row.get("profile"):  # a later entry's own loops (e.g. the compiled ones) join the kept row's profile
                kept = results[key].setdefault("profile", {})
                kept.update({loop: p for loop, p in row["profile"].items() if loop not in kept})
        part.save(results=results)
    if failed:
        raise RuntimeError(f"{len(failed)} bench row(s) failed: " + "; ".join(f["row"] for f in failed))


# --------------------------------------------------------------------------- data
def synthetic_archive(path: Path, per_class_train: int = 2, per_class_test: int = 2, seed: int = 0) -> Path:
    """A tiny CIFAR-10 archive in the official layout with learnable classes (dry mode; cf. tests/archive_factory)."""
    rng = np.random.default_rng(seed)

    def batch(n_per_class: int) -> bytes:
        labels = np.repeat(np.arange(10), n_per_class)
        colour = np.stack([(labels * 37) % 160, (labels * 71) % 160, (labels * 113) % 160], axis=1)
        images = (rng.integers(0, 90, size=(len(labels), 3, 32, 32)) + colour[:, :, None, None]).clip(0, 255)
        return pickle.dumps({"batch_label": "synthetic", "labels": labels.tolist(),
                             "data": images.astype(np.uint8).reshape(len(labels), -1),
                             "filenames": [f"img_{i}.png" for i in range(len(labels))]}, protocol=2)

    files = {f"data_batch_{b}": batch(per_class_train) for b in range(1, 6)}
    files["test_batch"] = batch(per_class_test)
    files["batches.meta"] = pickle.dumps({"label_names": list(range(10)), "num_cases_per_batch": 10 * per_class_train,
                                          "num_vis": 3072}, protocol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def find_archive(explicit: str | None) -> str:
    """--archive, $CIFAR10_ARCHIVE, the official archive at data/, else the stand-in `make standin` builds."""
    if explicit and not Path(explicit).is_file():
        raise SystemExit(f"archive not found: {explicit}")
    for candidate in (explicit, os.environ.get(config.ARCHIVE_ENV), ROOT / "data" / "cifar-10-python.tar.gz",
                      ROOT / "data" / "standin" / "cifar-10-python.tar.gz"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise SystemExit(f"no CIFAR-10 archive: pass --archive PATH, set {config.ARCHIVE_ENV}, or run `make standin` "
                     f"(builds data/standin/ from ../shared/data)")


def part_data(part: Part) -> None:
    """The full-size data (45k/5k/10k) prepared once into <out>/data/prepared for the train and columns parts."""
    from .data import prepare
    source = str(synthetic_archive(part.out / "data" / "synthetic.tar.gz")) if part.dry else find_archive(part.archive)
    start = time.perf_counter()
    meta = prepare(source, part.prepared)
    part.save(archive=Path(source).name, official=meta["official"], counts=meta["counts"],
              seconds=round(time.perf_counter() - start, 1))


# --------------------------------------------------------------------------- short training
def part_train(part: Part) -> None:
    """The gpu profile's first experiments for a few epochs on the full data: accuracy, images/s, peak memory.
    They train eager (no CUDA graph, no compile, whatever the profile sets): the reference the graphed and compiled
    runs after them are measured against."""
    import torch
    from . import train as train_mod
    epochs = 1 if part.dry else part.train_epochs
    probe = part.settings()
    hard = min(probe.train.relax.hard_epoch, epochs)
    settings = part.settings(f"train.epochs={epochs}", f"train.relax.hard_epoch={hard}", "train.cuda_graph=false",
                             "train.compile=none")
    names = [e.name for e in settings.experiments[:part.train_experiments]]
    counts = json.loads((part.prepared / "meta.json").read_text())["counts"]
    part.save(epochs=epochs, train_images=counts["train"] - settings.data.val_size, experiments={}, note="training stops at an epoch boundary when its share of the "
                                                  "part's time would be exceeded (train --time-budget)")
    runs: dict[str, Any] = {}
    for i, name in enumerate(names):
        share = max(part.remaining() - 10, 1) / (len(names) - i + len(TRAIN_AGAIN))  # leave shares for those
        epoch_s = max((r["epoch_wall_s"] or 0 for r in runs.values()), default=0)
        if epoch_s and share < epoch_s:  # a run's first epoch always runs: it would overrun the part's timeout
            runs[name] = {"model": settings.experiment(name).model, "skipped": f"its {share:.0f} s share is below "
                          f"one epoch of the run before (~{epoch_s:.0f} s); raise --budget-s"}
            part.save(experiments=runs)
            continue
        cuda = on_cuda(settings)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        run_dir = part.out / "train" / name
        stopped = until_budget(lambda: train_mod.train(settings, settings.experiment(name), run_dir, quiet=True,
                                                       live_dir=part.out / "train" / "live" / name, time_budget=share))
        runs[name] = {"model": settings.experiment(name).model, **run_figures(run_dir, cuda),
                      "stopped_by_budget": stopped, "budget_s": round(share, 1)}
        part.save(experiments=runs)
    first = runs.get(names[0], {}) if names else {}
    if first.get("epoch_wall_s"):
        part.save(graphed=train_again(part, settings, names[0], first, cuda_graph=True))
    trained = [settings.experiment(n) for n in names if runs.get(n, {}).get("epoch_wall_s")]
    if len(trained) >= 2:
        part.save(stacked=train_together(part, settings, trained, runs))
    if first.get("epoch_wall_s"):
        part.save(compiled=train_again(part, settings, names[0], first,
                                       compile="reduce-overhead" if on_cuda(settings) else "default"))


#: The runs the train part trains again after the gpu profile's first ones, in this order: the first run with its
#: step as one CUDA graph (train.cuda_graph; eager on a CPU), the runs stacked (train-stacked), and the first run
#: under torch.compile (last: reduce-overhead was slower than one graph of the whole step on the first H200 check,
#: and compiling takes long).
TRAIN_AGAIN = ("graphed", "stacked", "compiled")


def train_together(part: Part, settings: config.Settings, trained: list[config.Experiment],
                   runs: dict[str, Any]) -> dict[str, Any]:
    """The trained runs that stack, again as one stacked network (train-stacked), the same epochs: the stacked
    epoch's wall time against the sum of theirs (each with its own validation in both)."""
    from . import stacking
    from .train_stacked import train_stacked
    group = max(stacking.stacks(settings, trained, len(trained)), key=len)
    names = [e.name for e in group]
    sequential = sum(runs[n]["epoch_wall_s"] for n in names)
    share = part.remaining() - 10
    if len(group) < 2 or share < sequential:
        why = "no two of them stack" if len(group) < 2 else f"{share:.0f} s left, under {sequential:.0f} s"
        return {"experiments": names, "skipped": why}
    dirs = [part.out / "train" / f"{n}-stacked" for n in names]
    stopped = until_budget(lambda: train_stacked(settings, group, dirs, quiet=True, time_budget=share,
                                                 live_dirs=[part.out / "train" / "live" / d.name for d in dirs]))
    cuda = on_cuda(settings)
    figures = {n: run_figures(d, cuda) for n, d in zip(names, dirs)}
    epoch_s = figures[names[0]]["epoch_wall_s"]
    return {"experiments": names, "epochs_done": figures[names[0]]["epochs_done"], "epoch_wall_s": epoch_s,
            "sequential_epoch_wall_s": round(sequential, 2), "stopped_by_budget": stopped,
            "speedup": round(sequential / epoch_s, 2) if epoch_s else None,
            "accuracy": {n: {k: f[k] for k in ("val_natural_acc", "val_pgd_acc")} for n, f in figures.items()}}


def train_again(part: Part, settings: config.Settings, name: str, eager: dict[str, Any], **changes: Any
                ) -> dict[str, Any]:
    """The first run again with ``changes`` to its train settings (compile, cuda_graph), the same epochs: its last
    epoch against the eager run's (the first epoch pays for compiling or capturing)."""
    from . import train as train_mod
    cuda = on_cuda(settings)
    entry = {"experiment": name, "settings": {f"train.{k}": v for k, v in changes.items()}}
    share = part.remaining() - 10
    if share < 2 * eager["epoch_wall_s"]:
        return {**entry, "skipped": f"{share:.0f} s left, under two eager epochs"}
    changed = dataclasses.replace(settings, train=dataclasses.replace(settings.train, **changes))
    label = "-".join(f"{k}-{v}" for k, v in changes.items())
    run_dir = part.out / "train" / f"{name}-{label}"
    stopped = until_budget(lambda: train_mod.train(changed, changed.experiment(name), run_dir, quiet=True,
                                                   live_dir=part.out / "train" / "live" / run_dir.name,
                                                   time_budget=share))
    figures = run_figures(run_dir, cuda)
    ratio = (figures["last_epoch_images_per_s"] / eager["last_epoch_images_per_s"]
             if figures.get("last_epoch_images_per_s") and eager.get("last_epoch_images_per_s") else None)
    return {**entry, **figures, "stopped_by_budget": stopped, "speedup_last_epoch": round(ratio, 2) if ratio else None}


def on_cuda(settings: config.Settings) -> bool:
    """Whether the part's trainings run on CUDA (its peak memory is then CUDA's)."""
    import torch
    return torch.cuda.is_available() and settings.train.device != "cpu"


def until_budget(train_call: Callable[[], Any]) -> str | None:
    """Run a training with a --time-budget: None when it finished, else the message of where it stopped."""
    from .train import BudgetReached
    try:
        train_call()
    except BudgetReached as e:
        return str(e)
    return None


def run_figures(run_dir: Path, cuda: bool) -> dict[str, Any]:
    """Accuracy after the last epoch, training images/s and peak memory of one (possibly partial) run."""
    import torch
    from . import checkpoint
    from .runtime import RunPaths
    record = checkpoint.read_sidecar(RunPaths(run_dir).state)
    history = record.get("history") or []
    last = history[-1] if history else {}
    figures = {"epochs_done": record.get("epochs_done", 0),
               "val_natural_acc": last.get("val_natural_acc"), "val_pgd_acc": last.get("val_pgd_acc"),
               "train_images_per_s": round(float(np.mean([h["images_per_s"] for h in history])), 1) if history else None,
               "last_epoch_images_per_s": round(last["images_per_s"], 1) if last else None,
               "epoch_wall_s": round(record["wall_s"] / record["epochs_done"], 2) if record.get("epochs_done") else None,
               **{key: last[key] for key in ("graph_replays", "graph_failure") if key in last}}  # train.cuda_graph
    if cuda:
        figures.update(peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), memory="CUDA allocated")
    else:
        figures.update(peak_memory_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                       memory="host peak RSS of the process")
    return figures


# --------------------------------------------------------------------------- paper columns
#: Each audit attack (evaluate.audit_attacks) is timed, after the paper columns and while time is left, on one batch
#: of evaluate.batch_size test images: evaluate attacks in batches of that size, and a smaller batch would overstate
#: the cost per image on a GPU held back by launches. Dry: a few images.
DRY_AUDIT_TIMING_IMAGES = 4


def columns_model(part: Part, device: Any, channels_last: bool) -> tuple[Any, str]:
    """The model the columns are timed on: the train part's noisy run, finished if one is, else partly trained
    (a run its time budget stopped: its deployed weights of the last epoch), else an untrained one."""
    import torch
    from . import evaluate
    from .models import build
    from .runtime import RunPaths
    runs = [p for p in sorted((part.out / "train").glob(f"{NOISY_MODEL}-*")) if RunPaths(p).deployed.is_file()]
    finished = [p for p in runs if not RunPaths(p).incomplete.is_file()]
    if finished:
        model, _, _ = evaluate.load_run(finished[0], device, channels_last)
        return model, f"trained in the train part ({finished[0].name})"
    if runs:
        model, _, sidecar = evaluate.load_run(runs[0], device, channels_last, allow_incomplete=True)
        return model, (f"partly trained in the train part ({runs[0].name}, not finished: stopped by its time budget "
                       f"or diverged; weights of epoch {(sidecar.get('selected') or {}).get('epoch', '?')}): timing only")
    arch = dry_model(NOISY_MODEL) if part.dry else NOISY_MODEL
    model = build(arch, seed=0).to(device).eval()
    model = model.to(memory_format=torch.channels_last) if channels_last else model
    return model, f"untrained {arch} (timing only: the train part left no model)"


def part_columns(part: Part) -> None:
    """The paper columns A1-A4 for one model on (up to) 10,000 test images, one noise seed, fp32 as configured;
    then, while time is left, each audit attack on a few images (its cost per image, for the grid estimate)."""
    import torch
    from . import scoring
    from .data import load_prepared
    from .loader import pick_device
    from .runtime import channels_last_for
    settings = part.settings()
    ev = settings.evaluate
    device = pick_device(ev.device)
    channels_last = channels_last_for(device, settings)
    model, source = columns_model(part, device, channels_last)
    amp = ev.amp == "bf16" or (ev.amp == "auto" and device.type == "cuda")
    scorer = scoring.Scorer(scoring.AutocastLogits(model, device.type) if amp else model, device, ev.batch_size,
                             True, channels_last)
    data = load_prepared(part.prepared)
    x_test, y_test = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test).long()
    n = min(len(y_test), 10000)
    part.save(model=source, images=n, seeds=1, amp="bf16" if amp else "fp32", device=str(device), columns={})
    noisy = scoring.noise_active(model)

    jobs, _ = scoring.plan(ev, n, noisy)  # evaluate's own jobs: their eps, and no noisy-only attack on a plain model

    def timed(job: scoring.Job, images: int) -> dict[str, Any]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        entry, _ = scoring.run_job(scorer, dataclasses.replace(job, n=images, seeds=(0,)), x_test, y_test, noisy)
        return {"seconds": entry["seconds"], "accuracy": entry["mean"],
                "images_per_s": round(images / max(entry["seconds"], 1e-9), 1)}

    columns: dict[str, Any] = {}
    for job in sorted((j for j in jobs if not j.audit and j.spec.paper_column), key=lambda j: j.spec.paper_column):
        columns[job.key] = {"column": job.spec.paper_column, **timed(job, n)}
        part.save(columns=columns, total_s=round(sum(c["seconds"] for c in columns.values()), 2))
    sample = min(n, DRY_AUDIT_TIMING_IMAGES if part.dry else ev.batch_size)  # one evaluation batch, as evaluate runs
    audit: dict[str, Any] = {}
    for job in (j for j in jobs if j.audit and j.eps == ev.audit_eps[0]):
        key, label = job.key.split("@")[0], job.spec.label
        dearest = max((a["seconds"] for a in audit.values() if "seconds" in a), default=0.0)
        if part.remaining() < 3 * dearest:
            audit[key] = {"skipped": f"{part.remaining():.0f} s left in the part"}
        else:
            try:
                audit[key] = {"label": label, **timed(job, sample)}
            except Exception as e:  # e.g. AutoAttack without scipy on a GPU image: the other attacks still count
                audit[key] = {"label": label, "failed": f"{type(e).__name__}: {e}"[:500]}
        part.save(audit=audit, audit_images=sample)


PARTS = {"env": part_env, "cuda_tests": part_cuda_tests, "data": part_data, "train": part_train,
         "columns": part_columns, "bench": part_bench}
