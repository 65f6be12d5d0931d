"""``publish``: the self-contained bundle ``results/<profile>/`` a reviewer reads without running anything,
and the generated results block at the top of the README.

The bundle holds the verdicts (verification.md/.json), the summary table, the tables and figures (PNG),
the executed notebooks, every run's metrics and every deployed model in its packed form with a model
card (in the spirit of RobustBench's model_info). It is built in a staging folder and swapped in whole;
it carries no machine paths (archives are named by file name and md5) and says which code made it.
``python -m paper_repro report --bundle results/<profile>`` rebuilds its tables, figures and notebooks
from it alone (no training, no dataset); ``paper_repro.zoo.load`` hands out its models.

``publish --readme README.md --bundle results/cpu`` only rewrites the README's generated block (between
``<!-- results:start -->`` and ``<!-- results:end -->``) from the bundle's verification.json.
"""
from __future__ import annotations

import argparse
import os
import json
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import atomic, checkpoint, comparability, config, recipe

BUNDLE_SCHEMA = 1
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|tmp|root|home|Users|mnt|scratch)/[^\s\"'<>)]*")
HEADLINE_FIGURE = "03_quantized_paper_attacks.png"  # C7, the paper's "missing benchmark", shown in the README
TEXT_SUFFIXES = (".json", ".md", ".csv", ".ipynb", ".txt", ".yaml")
FIGURE_SUFFIXES = (".png",)


class PublishError(config.ConfigError):
    """The bundle cannot be built (missing inputs, machine paths in an output)."""


# --------------------------------------------------------------------------- model cards
def accuracy_card(m: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """An accuracy with what it rests on: n images, seeds, attack settings and its 95% interval."""
    from . import checks

    entry = (m.get("accuracy") or {}).get(key)
    if not entry:
        return None
    est = checks.accuracy(m, key)
    return {"accuracy": entry["mean"], "n": entry["n"], "seeds": entry.get("seeds"), "eps": entry.get("eps"),
            "ci95": est.interval if est else None, "interval": est.how if est else None,
            "label": entry.get("label"), "eot": entry.get("eot")}


def model_card(m: Mapping[str, Any], packed_bytes: int, packed_file: str) -> dict[str, Any]:
    """One model's card: what it is, how it was trained and evaluated, what it scores, where it came from."""
    training = m.get("training") or {}
    prov = m.get("provenance") or {}
    acc = m.get("accuracy") or {}
    autoattack = {k: accuracy_card(m, k) for k in acc if k.startswith("autoattack")}
    audit = {k: accuracy_card(m, k) for k in acc if (acc[k] or {}).get("audit") and not k.startswith("autoattack")}
    return {
        "name": m["run"], "profile": m.get("profile"), "model": m.get("model"),
        "arch": prov.get("arch") or m.get("model"), "quantizer": m.get("quantizer"),
        "quantizer_options": m.get("quantizer_options") or {}, "method": m.get("method"), "loss": m.get("loss"),
        "loss_params": m.get("loss_params") or {}, "noise": m.get("noise"), "noise_active": m.get("noise_active"),
        "eps": recipe.PAPER_EPS, "threat_model": "Linf", "dataset": "cifar10",
        "clean_acc": (acc.get("natural") or {}).get("mean"),
        "paper_columns": {recipe.PAPER_COLUMNS[k]: accuracy_card(m, k) for k in recipe.PAPER_ATTACKS if k in acc},
        "audit": audit, "autoattack": autoattack,
        "sparsity": {k: (m.get("sparsity") or {}).get(k) for k in ("weight", "channel", "filter")},
        "sparsity_at_init": {k: (m.get("sparsity_at_init") or {}).get(k) for k in ("weight", "channel")}
        if m.get("sparsity_at_init") else None,
        "size": {"packed_bytes": packed_bytes, "fp32_bytes": (m.get("size") or {}).get("fp32_bytes"),
                 "compression": (m.get("size") or {}).get("compression"), "file": packed_file},
        "training": {k: training.get(k) for k in ("selection_metric", "selected", "epochs_done", "phase2_epochs",
                                                  "trained_quantized", "split")},
        "recipe": training.get("settings"), "deviations_from_paper": comparability.deviations(m),
        "sanity": {k: v.get("passed") for k, v in (m.get("sanity") or {}).items() if isinstance(v, Mapping)},
        "data": {k: (m.get("data") or {}).get(k) for k in ("source", "archive_md5", "official", "n_train", "n_test")},
        "code_commit": (prov.get("versions") or {}).get("code_commit"),
        "versions": {"train": prov.get("versions"), "evaluate": prov.get("eval_versions")},
        "hardware": {"train": prov.get("device"), "evaluate": prov.get("eval_device"), "platform": prov.get("platform")},
        "wall_s": {"train": training.get("wall_s") or prov.get("wall_s"),
                   "evaluate": (m.get("timing") or {}).get("total_s")},
        "load": f"paper_repro.zoo.load({m['run']!r}, profile={m.get('profile')!r})",
    }


def pack_model(run_dir: Path, target: Path) -> int:
    """runs/<run>/deployed.safetensors -> the packed file (codes + one scale per quantized tensor);
    returns its size in bytes. Full-precision runs are stored as float (nothing to pack)."""
    from .quant import save_packed
    from .runtime import RunPaths

    tensors, sidecar = checkpoint.load(RunPaths(run_dir).deployed, "cpu")
    quantized = list(sidecar.get("quantized") or [])
    scheme = sidecar.get("quantizer") if quantized else None
    meta = {k: sidecar.get(k) for k in ("arch", "arch_config", "run", "model", "quantizer", "quantizer_options",
                                       "method", "loss", "loss_params", "noise")}
    header = save_packed(target, tensors, quantized, scheme, meta=meta, **(sidecar.get("quantizer_options") or {}))
    return int(header["file_bytes"])


# --------------------------------------------------------------------------- the bundle
def _copy_tree(src: Path, dst: Path, suffixes: Sequence[str]) -> list[Path]:
    out = []
    for f in sorted(src.rglob("*")) if src.is_dir() else []:
        if f.is_file() and f.suffix in suffixes:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            out.append(target)
    return out


_md5 = atomic.file_md5


def machine_paths(folder: Path) -> list[str]:
    """'file: path' for every absolute machine path found in the bundle's text files."""
    found = []
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in TEXT_SUFFIXES:
            for hit in sorted(set(MACHINE_PATH.findall(f.read_text(errors="replace")))):
                found.append(f"{f.relative_to(folder)}: {hit}")
    return found


def data_record(meta_path: Path) -> dict[str, Any]:
    """The prepared data's meta.json as it is (prepare records file names and md5s, never machine paths;
    the bundle's path check guards that), so notebooks rebuilt from the bundle show the same provenance."""
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def build(metrics_dir: Path, runs_dir: Path, reports_dir: Path, data_meta: Path, out: Path,
          settings: config.Settings, timing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the bundle into a staging folder beside ``out`` and swap it in; return its manifest."""
    from .verdicts import load_metrics

    metrics = load_metrics(metrics_dir)
    if not metrics:
        raise PublishError(f"{metrics_dir}: no metrics to publish (run the pipeline first)")
    verification = reports_dir / "verification.json"
    if not verification.is_file():
        raise PublishError(f"{verification} is missing: run the verify stage first")
    stage = out.with_name(out.name + ".staging")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "models").mkdir(parents=True)
    for name in ("verification.md", "verification.json", "summary.csv", "metrics.json"):
        if (reports_dir / name).is_file():
            shutil.copyfile(reports_dir / name, stage / name)
    _copy_tree(reports_dir / "tables", stage / "tables", (".csv", ".md"))
    _copy_tree(reports_dir / "figures", stage / "figures", FIGURE_SUFFIXES)
    _copy_tree(reports_dir / "notebooks", stage / "notebooks", (".ipynb",))
    cards = {}
    (stage / "metrics").mkdir()
    for m in metrics:
        run = m["run"]
        shutil.copyfile(metrics_dir / f"{run}.json", stage / "metrics" / f"{run}.json")
        packed = stage / "models" / f"{run}.safetensors"
        size = pack_model(runs_dir / run, packed)
        card = model_card(m, size, packed.name)
        atomic.write_json(stage / "models" / f"{run}.json", card, indent=1)
        cards[run] = card
    if data_meta.is_file():
        shutil.copyfile(data_meta, stage / "data.json")
    atomic.write_json(stage / "report_params.json",
                      {"profile": settings.profile, "notebooks": settings.report.get("notebooks", {}) or {}}, indent=1)
    manifest = {
        "schema": BUNDLE_SCHEMA, "profile": settings.profile,
        "code_commits": sorted({str(c.get("code_commit")) for c in cards.values()}),
        "publish_commit": checkpoint.code_commit(),
        "data": {k: data_record(data_meta).get(k) for k in ("source", "archive_md5", "official")},
        "runs": sorted(cards), "timing": dict(timing or {}),
    }
    manifest = seal(stage, manifest)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    stage.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def seal(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write bundle.json listing every file with its md5; refuse (and remove ``folder``) on a machine path."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != "bundle.json")
    manifest = {**manifest, "bytes": sum(f.stat().st_size for f in files),
                "files": {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "md5": _md5(f)} for f in files}}
    atomic.write_json(folder / "bundle.json", manifest, indent=1)
    leaks = machine_paths(folder)
    if leaks:
        shutil.rmtree(folder, ignore_errors=True)
        raise PublishError("machine paths in the bundle (name files, never paths): " + "; ".join(leaks[:5]))
    return manifest


def command(*argv: str) -> None:
    """``python -m paper_repro ARGV`` in this directory; its last lines in the error when it fails."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "paper_repro", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise PublishError(f"`{' '.join(argv[:1])}` failed (exit {proc.returncode}):\n{tail}")


def reverify(bundle: Path, work: Path, notebooks: Path, quiet: bool = True) -> dict[str, Any]:
    """Judge a published bundle again with this code, from its own metrics and models (no runs, no data): its
    verification, summary, tables, figures and executed notebooks are rewritten; its metrics, packed models,
    cards, training commits and timing stay. The manifest names the commit that judged it
    (``reverify_commit``). On a failure the bundle is left as it was. Give ``bundle``, ``work`` and ``notebooks``
    as relative paths: the executed notebooks record them. verify and report run as their own commands (a stage
    imports no other stage)."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    old = bundle.with_name(bundle.name + ".old")
    if old.exists():  # an interrupted reverify: it holds the bundle as it was, and this run must not replace it
        raise PublishError(f"{old} exists: a reverify was interrupted and it holds the bundle as it was; restore it "
                           f"(rm -r {bundle} && mv {old} {bundle}) or, if {bundle} is right, remove it")
    partial = old.with_name(old.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(bundle, partial)
    partial.rename(old)  # the copy is whole before it counts
    try:  # in place, so that the notebooks' parameters name the bundle itself
        command("verify", "--metrics", str(bundle / "metrics"), "--out", str(bundle))
        command("report", "--bundle", str(bundle), "--out", str(work), "--notebooks", str(notebooks),
                *(["--quiet"] if quiet else []))
        for sub, suffixes in (("tables", (".csv", ".md")), ("figures", FIGURE_SUFFIXES), ("notebooks", (".ipynb",))):
            shutil.rmtree(bundle / sub, ignore_errors=True)
            _copy_tree(work / sub, bundle / sub, suffixes)
        kept = {k: v for k, v in manifest.items() if k not in ("bytes", "files")}
        manifest = seal(bundle, {**kept, "reverify_commit": checkpoint.code_commit()})
    except BaseException:
        shutil.rmtree(bundle)
        old.rename(bundle)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return manifest


# --------------------------------------------------------------------------- README block
def _key_numbers(row: Mapping[str, Any]) -> str:
    """The few numbers a reader needs next to a claim's verdict."""
    ev = row.get("evidence") or []
    cid = row["id"]
    if cid in ("C3", "C4", "C2"):
        return "; ".join(f"{e.get('group')}: {_arms(e)}" for e in ev) or "-"
    if cid == "C5":
        return "; ".join(f"{e.get('group')} {e.get('attack')}: {_arms(e)}" for e in ev) or "-"
    if cid == "C1":
        return "; ".join(f"{e['run']}: {e['weight sparsity']:.1f}% zeros vs {e.get('at init', float('nan')):.1f}% "
                         f"at init ({e.get('outcome')}{_why_open(e)})" for e in ev) or "-"
    if cid == "C6":
        return "; ".join(f"{e['attack']}: " + " / ".join(f"k={k} {v:.1f}" for k, v in e["by_k"].items()) for e in ev) or "-"
    if cid == "C7":
        return "; ".join(f"{e['run']}: " + "/".join(f"{e[a]:.1f}" for a in recipe.PAPER_ATTACKS if a in e)
                         for e in ev) + " (A1/A2/A3/A4, %)" if ev else "-"
    return "-"


def _arms(e: Mapping[str, Any]) -> str:
    values = [(k, v) for k, v in e.items() if k.endswith(")") and isinstance(v, (int, float))]
    if len(values) != 2:
        return "-"
    (_, va), (_, vb) = values
    return f"{va:.2f} -> {vb:.2f} ({e.get('outcome')})"


def _why_open(e: Mapping[str, Any]) -> str:
    """Why a C1 row has no interval: the baseline lacks its per-layer counts."""
    from .checks import NO_INIT_LAYERS

    return ": no per-layer counts at init" if e.get("note") == NO_INIT_LAYERS else ""


def readme_block(verification: Mapping[str, Any], bundle: Mapping[str, Any], bundle_dir: str) -> str:
    """The generated README block: one line per claim C1-C7, with the scale and data it rests on."""
    prov = verification["provenance"]
    data = bundle.get("data") or {}
    timing = bundle.get("timing") or {}
    lines = [README_START,
             f"<!-- generated by `python -m paper_repro publish --readme README.md --bundle {bundle_dir}`; "
             "do not edit by hand -->",
             f"**Reduced reproduction, profile `{bundle.get('profile')}`** on "
             f"{'the official CIFAR-10' if data.get('official') else 'a NOT official CIFAR-10 stand-in'} "
             f"(`{data.get('source')}`, md5 `{data.get('archive_md5')}`), code `"
             + ", ".join(c[:12] + ("+dirty" if c.endswith("+dirty") else "") for c in bundle.get("code_commits", []))
             + "`"
             + (f", {timing['make_cpu_minutes']:.0f} min for `make cpu` on {timing.get('machine')}" if
                timing.get("make_cpu_minutes") else "")
             + (f"; verdicts judged again by code `{bundle['reverify_commit'][:12]}` (`publish --reverify`)"
                if bundle.get("reverify_commit") else "") + ". "
             f"{prov['banner'] or 'Comparable with the paper.'}: every verdict below is what the claim gives at "
             "this scale, not a verdict on the paper.", "",
             "| Claim | Verdict at this scale | Key numbers |", "|---|---|---|"]
    for row in verification["qualitative"]:
        verdict = row.get("would_be") or row["verdict"]
        lines.append(f"| {row['id']}: {row['claim']} | **{verdict}** | {_key_numbers(row)} |")
    headline = f"figures/{HEADLINE_FIGURE}"
    if headline in (bundle.get("files") or {}):
        lines += ["", f"![Accuracy of the deployed float, binary, ternary and 4-bit En1ResNet20 under the paper's "
                      f"attacks]({bundle_dir}/{headline})"]
    lines += ["", "Deviations from the paper recipe: " + "; ".join(prov.get("deviations") or ["none"]) + ".",
              "", f"Full report: [`{bundle_dir}/verification.md`]({bundle_dir}/verification.md); models: "
              f"`paper_repro.zoo.load(name, profile=\"{bundle.get('profile')}\")`.", README_END]
    return "\n".join(lines)


def update_readme(readme: Path, bundle_dir: Path) -> bool:
    """Rewrite the block between the markers; True when the file changed."""
    verification = json.loads((bundle_dir / "verification.json").read_text())
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise PublishError(f"{readme}: no {README_START} ... {README_END} block to fill")
    rel = bundle_dir.as_posix() if not bundle_dir.is_absolute() else bundle_dir.name
    block = readme_block(verification, manifest, rel)
    new = text[:text.index(README_START)] + block + text[text.index(README_END) + len(README_END):]
    if new != text:
        atomic.write_text(readme, new)
    return new != text


def machine() -> str:
    """'AMD EPYC ... (2 cores)' from /proc/cpuinfo where there is one."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} cores)"


def measured_time(timing: Mapping[str, Any]) -> dict[str, Any]:
    """The pipeline's wall time up to publishing, from the start time `make cpu` recorded."""
    import time

    out = dict(timing)
    if "started" in out:
        out["make_cpu_minutes"] = round((time.time() - float(out["started"])) / 60, 1)
        out["note"] = "wall time of the cpu recipe of `make cpu` (after the set-up) up to this publish step"
    out["machine"] = machine()
    return out


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="bundle folder (default: <repository>/results/<profile>)")
    p.add_argument("--metrics", type=Path, default=Path("metrics"))
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--timing", type=Path, help="JSON with the measured pipeline time to record in the bundle")
    p.add_argument("--readme", type=Path, help="only rewrite this README's results block from --bundle")
    p.add_argument("--bundle", type=Path, help="with --readme: the bundle to read (default: results/cpu)")
    p.add_argument("--reverify", type=Path, metavar="BUNDLE",
                   help="judge a published bundle again with this code (verification, tables, figures, notebooks "
                        "from its own metrics and models; no runs or data); then `--readme README.md`")
    p.add_argument("--notebooks", type=Path, help="with --reverify: the notebooks to execute (default: the "
                                                  "repository's, relative to here)")


def main(args: argparse.Namespace) -> int:
    if args.readme:
        bundle = args.bundle or Path("results") / "cpu"
        if not (bundle / "verification.json").is_file():
            raise PublishError(f"{bundle}: no published bundle (run `make cpu` or `publish` first)")
        changed = update_readme(args.readme, bundle)
        print(f"{args.readme}: results block {'updated' if changed else 'already up to date'} from {bundle}")
        return 0
    if args.reverify:
        if not (args.reverify / "bundle.json").is_file():
            raise PublishError(f"{args.reverify}: not a published bundle (no bundle.json)")
        work = Path(args.reports) / f"reverify-{args.reverify.name}"
        notebooks = args.notebooks or Path(os.path.relpath(Path(__file__).resolve().parents[1] / "notebooks"))
        manifest = reverify(args.reverify, work, notebooks, args.quiet)
        print(f"re-verified {args.reverify} at {manifest['reverify_commit'][:12]} ({len(manifest['runs'])} runs); "
              f"now: python -m paper_repro publish --readme README.md --bundle {args.reverify}")
        return 0
    settings = config.load(args.params, args.overrides)
    out = args.out or Path(__file__).resolve().parents[1] / "results" / settings.profile
    timing = measured_time(json.loads(args.timing.read_text())) if args.timing and args.timing.is_file() else None
    manifest = build(args.metrics, args.runs, args.reports, Path(settings.data.prepared) / "meta.json", out,
                     settings, timing)
    print(f"published {len(manifest['runs'])} runs to {out} ({manifest['bytes'] / 1e6:.1f} MB, "
          f"{len(manifest['files'])} files)")
    return 0
