"""``gpu-check``: everything that needs CUDA, in one prepared run that fits a short GPU window (issue 14).

    python -m paper_repro gpu-check --out DIR [--dry] [--budget-s 480]      (make gpu-check)

Parts, in order (paper_repro/gpu_parts.py): ``env`` (versions, device), ``cuda_tests`` (``pytest -m cuda``:
the GPU-only tests), ``bench`` (ours vs the plain baseline, repeated; K stacked vs sequential), ``data``
(the full-size data prepared once), ``train`` (the gpu profile's first experiments for a few epochs:
accuracy, images/s, peak memory) and ``columns`` (time of the paper columns A1-A4 for one model on 10,000
test images). Each part runs in its own process with its own timeout (its share of ``--budget-s``), so
a hung or slow part costs only its share. The check fails soft: after every part DIR/gpu_check.json and
DIR/gpu_check.md are rewritten with what ran, what timed out and what failed (log tails in DIR/logs/).
Exit status 0 when every part passed, 1 otherwise (the report is written either way).

``--dry`` runs every part tiny on the CPU with a synthetic archive: it is how CI tests this command.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import atomic, config
from .gpu_parts import GPU_PARAMS, PARTS, ROOT, Part, git_commit
from .gpu_report import grid_estimate, markdown
from .runtime import positive_seconds

#: Relative share of the budget each part may take. A part's timeout is its share of the time still left
#: among the parts still to run, so time an early part does not use passes to the later ones (bench runs
#: last: on the first H200 run it needed ~170 s while train/columns/data left ~180 s of their shares unused).
SHARES = {"env": 0.04, "cuda_tests": 0.14, "data": 0.06, "train": 0.30, "columns": 0.20, "bench": 0.26}
NEEDS = {"train": "data", "columns": "data"}  # part -> the part whose output it reads
REPORT_VERSION = 1
LOG_TAIL_LINES = 25


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(params=GPU_PARAMS)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, logs/, parts/")
    p.add_argument("--dry", action="store_true", help="every part tiny, on the CPU, with synthetic data (CI)")
    p.add_argument("--budget-s", type=positive_seconds, default=480.0,
                   help="total seconds; each part's timeout is its share (default 480: 8 minutes)")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="run only these parts")
    p.add_argument("--archive", help="CIFAR-10 archive for the data part (default: $CIFAR10_ARCHIVE, "
                                     "data/cifar-10-python.tar.gz, then data/standin/)")
    p.add_argument("--train-experiments", type=int, default=2, help="first N experiments of the profile to train")
    p.add_argument("--train-epochs", type=int, default=3, help="epochs of each (fewer when its time share runs out)")
    p.add_argument("--render", type=Path, metavar="SRC",
                   help="re-render SRC/gpu_check.json (a report made elsewhere) into --out with this code; runs nothing")
    p.add_argument("--root-was", default=str(ROOT),
                   help="with --render: the repository folder on the machine that made the report (scrubbed to .)")
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # internal: run one part here
    p.add_argument("--part-timeout", type=float, default=0.0, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    if args.train_experiments < 1 or args.train_epochs < 1:
        raise config.ConfigError("--train-experiments and --train-epochs must be >= 1")
    if not Path(args.params).is_file():
        raise config.ConfigError(f"{args.params}: settings file not found (gpu-check reads the gpu profile)")
    out = Path(args.out).resolve()
    if args.render:
        return render(Path(args.render), out, args.root_was)
    if args.part:
        part = Part(args.part, out, args.dry, args.part_timeout, Path(args.params).resolve(), args.archive,
                    args.train_experiments, args.train_epochs)
        PARTS[args.part](part)
        return 0
    return orchestrate(args, out)


def orchestrate(args: argparse.Namespace, out: Path) -> int:
    """Run the chosen parts one after another, each in a child process under its timeout; report after each."""
    for sub in ("parts", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {"kind": "gpu-check", "version": REPORT_VERSION, "dry": bool(args.dry),
                              "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "budget_s": args.budget_s, "params": _shown(Path(args.params)),
                              "command": "python -m paper_repro gpu-check " + " ".join(map(portable, sys.argv[2:])),
                              "parts": {}}
    chosen = [name for name in PARTS if name in args.parts]
    bar = tqdm(chosen, desc="gpu-check", unit="part", disable=args.quiet)
    for i, name in enumerate(bar):
        bar.set_postfix_str(name)
        left = args.budget_s - (time.monotonic() - started)
        timeout = part_timeout(name, chosen[i:], left)
        needed = NEEDS.get(name)
        if needed in chosen and report["parts"].get(needed, {}).get("status") != "ok":
            entry = {"status": "skipped", "reason": f"needs the {needed} part, which did not pass"}
        elif timeout < 5:
            entry = {"status": "skipped", "reason": f"no time left in the {args.budget_s:g} s budget"}
        else:
            entry = run_part(args, out, name, timeout)
        report["parts"][name] = entry
        print(f"gpu-check {name}: {entry['status']}" + (f" in {entry['seconds']:.0f} s" if "seconds" in entry else "")
              + (f" ({why(entry)})" if entry["status"] != "ok" else ""), flush=True)
        write_report(out, report, started)
    report = write_report(out, report, started)
    print(f"gpu-check: {'all parts passed' if report['ok'] else 'NOT all parts passed'}; "
          f"report: {out / 'gpu_check.md'}", flush=True)
    return 0 if report["ok"] else 1


#: Seconds a part needs at the least whatever the budget (env: importing torch and starting CUDA took 8-11 s on
#: the H200, 4 s on the CPU and over 20 s on a loaded 2-core CPU; a 150 s check gave it 8 s and killed it).
MIN_TIMEOUT_S = {"env": 30.0}


def part_timeout(name: str, still_to_run: list[str], left: float) -> float:
    """``name``'s share of the seconds ``left`` among the parts still to run (the last one gets all of it),
    at least its MIN_TIMEOUT_S while that much is left."""
    return min(left, max(left * SHARES[name] / sum(SHARES[n] for n in still_to_run), MIN_TIMEOUT_S.get(name, 0.0)))


def run_part(args: argparse.Namespace, out: Path, name: str, timeout: float) -> dict[str, Any]:
    """One part in a child process (its own session, so a timeout kills everything it started)."""
    cmd = [sys.executable, "-m", "paper_repro", "gpu-check", "--out", str(out), "--params",
           str(Path(args.params).resolve()), "--part", name, "--part-timeout", f"{timeout:.1f}",
           "--train-experiments", str(args.train_experiments), "--train-epochs", str(args.train_epochs), "--quiet"]
    cmd += ["--dry"] if args.dry else []
    cmd += ["--archive", str(Path(args.archive).resolve())] if args.archive else []
    log = out / "logs" / f"{name}.log"
    (out / "parts" / f"{name}.json").unlink(missing_ok=True)
    start = time.monotonic()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc: int | None = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc, status = None, "timeout"
    entry: dict[str, Any] = {"status": status, "seconds": round(time.monotonic() - start, 1),
                             "timeout_s": round(timeout, 1), "returncode": rc, "log": f"logs/{name}.log"}
    result = out / "parts" / f"{name}.json"
    entry["result"] = json.loads(result.read_text()) if result.is_file() else {}
    if status != "ok":
        entry["error"] = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        if status == "timeout":
            entry["error"] += f"\n(killed after its {timeout:.0f} s timeout; the result holds what it saved)"
    return entry


def why(entry: dict[str, Any]) -> str:
    """One line on why a part did not pass: the skip reason or the last line of its log."""
    lines = (entry.get("error") or "").strip().splitlines()
    return entry.get("reason") or (lines[-1] if lines else "no output")


def write_report(out: Path, report: dict[str, Any], started: float) -> dict[str, Any]:
    """DIR/gpu_check.json and DIR/gpu_check.md from the parts so far (atomic: a kill leaves the last full one)."""
    parts = report["parts"]
    env = parts.get("env", {}).get("result", {})
    report.update(device=env.get("device"), versions={k: env.get(k) for k in
                                                      ("python", "torch", "torchvision", "cuda_build", "cudnn",
                                                       "driver", "paper_repro", "git_commit")},
                  wall_s=round(time.monotonic() - started, 1),
                  ok=bool(parts) and all(p["status"] == "ok" for p in parts.values()))
    report["estimate"] = grid_estimate(parts, report["dry"])
    shown = scrub(report, {str(out): "<out>", str(ROOT): "."})  # the report names no machine's folders
    atomic.write_json(out / "gpu_check.json", shown, indent=1, default=str)
    atomic.write_text(out / "gpu_check.md", markdown(shown))
    return report


def scrub(value: Any, replacements: dict[str, str]) -> Any:
    """``value`` with every string's absolute folders replaced (longest first: the out folder may be in the repo)."""
    if isinstance(value, str):
        for old in sorted(replacements, key=len, reverse=True):
            value = value.replace(old, replacements[old])
        return value
    if isinstance(value, dict):
        return {k: scrub(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, replacements) for v in value]
    return value


def render(source: Path, out: Path, root_was: str) -> int:
    """Re-render a report made elsewhere (e.g. on a GPU machine) with this code: folders scrubbed, estimate
    recomputed from its measured parts, provenance recorded. The measured figures are copied unchanged."""
    raw_path = source / "gpu_check.json"
    if not raw_path.is_file():
        raise config.ConfigError(f"{raw_path}: no gpu-check report to render")
    raw = json.loads(raw_path.read_text())
    words = raw.get("command", "").split()
    out_was = words[words.index("--out") + 1] if "--out" in words[:-1] else None
    report = scrub(raw, {k: v for k, v in ((out_was, "<out>"), (root_was, ".")) if k and k.startswith("/")})
    report["command"] = " ".join(portable(w) if w.startswith("/") else w for w in words)
    report["estimate"] = grid_estimate(report["parts"], report["dry"])
    report["rendered"] = {"from": f"{raw_path.name} md5 {atomic.file_md5(raw_path)}",
                          "by": "python -m paper_repro gpu-check --render", "code_commit": git_commit(),
                          "note": "figures as measured; folders scrubbed and the estimate recomputed by this code"}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "gpu_check.json", report, indent=1, default=str)
    atomic.write_text(out / "gpu_check.md", markdown(report))
    print(f"rendered {raw_path} -> {out / 'gpu_check.md'}")
    return 0


def portable(arg: str) -> str:
    """A command-line argument without this machine's absolute paths: relative to the repository, else the name."""
    path = Path(arg)
    if not path.is_absolute():
        return arg
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
