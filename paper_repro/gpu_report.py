"""The gpu-check report: its Markdown rendering and the paper-grid estimate derived from the measured parts.

The estimate is arithmetic on measured figures only (an epoch of each trained model, the paper columns of
one model); the scaling assumptions are written into the report beside the numbers, and with ``--dry`` it
is labelled as not a GPU figure.
"""
from __future__ import annotations

import statistics
from typing import Any

from . import config, recipe
from .gpu_parts import GPU_PARAMS, ROOT
from .models.enresnet import parse_arch
from .models.resnet import blocks_per_stage

ASSUMPTIONS = (
    "training time of a run = epochs x (measured wall time of one epoch, validation included, of the trained "
    "model with the same noise: plain resnet20 or en1resnet20) x members x depth factor (blocks / 3; WideResNet "
    "and VGG: their multiply-accumulates per image relative to ResNet20's, counted) x passes per image relative "
    "to PGD-10 training (natural 1, pgd_at 1+steps, tradeoff/trades 2+steps) x training images relative to "
    "CIFAR-10's 45,000 (SVHN 68,257)",
    "paper-column time of a run = measured A1-A4 time of one model per image x test images (10,000; SVHN "
    "26,032) x seeds x members x depth factor",
    "audit time of a run = for each of its audit attacks (evaluate.audit_attacks at each audit eps), the measured "
    "time per image of that attack on the columns part's model (one evaluation batch) x audit examples x audit seeds "
    "x members x depth factor; every run is priced as noisy (noise-free ones skip the EOT repeats and the noisy-only "
    "attack); AutoAttack attacks only the images still classified correctly, so its time grows with robust accuracy "
    "and, timed on a partly trained or untrained model, is a lower bound for a trained one; an attack a profile "
    "has that the gpu profile did not time is priced at the dearest timed one; given only when every audit "
    "attack the columns part ran was timed",
    "not included: the sanity attacks, data preparation, queueing",
    "'stacked': the training hours divided by the largest measured K-stacked speedup (bench), as if every run "
    "trained in a stack of K (runs stack when they share depth, loss kind and training attack)",
    "'one CUDA graph': the training hours divided by the last-epoch speedup the train part measured for its first "
    "run trained again with train.cuda_graph (a ResNet20 or En1ResNet20 speedup applied to every model)",
)


def passes(loss: str, steps: int) -> int:
    """Forward/backward passes per training image: the attack's steps plus the loss's own passes."""
    return {"natural": 1, "pgd_at": 1 + steps, "tradeoff": 2 + steps, "trades": 2 + steps}[loss]


def model_factor(model: str) -> float:
    """Cost of a model relative to one ResNet20 member: members x blocks per stage / 3 for ResNets (their
    counted MACs agree within 4%); WideResNet and VGG: members x counted MACs / ResNet20's."""
    arch = parse_arch(model)
    if arch.family == "resnet":
        return arch.members * blocks_per_stage(arch.depth) / 3
    return arch.members * mac_ratio(f"{arch.family}{arch.depth}" + (f"-{arch.widen}" if arch.family == "wrn" else ""))


def mac_ratio(member: str) -> float:
    """Multiply-accumulates of one ``member`` per 32x32 image over ResNet20's (cached: counting builds it)."""
    if member not in _MAC_RATIOS:
        from .models import build, count_macs

        _MAC_RATIOS[member] = round(count_macs(build(member)) / count_macs(build("resnet20")), 2)
    return _MAC_RATIOS[member]


_MAC_RATIOS: dict[str, float] = {}


def noisy(model: str) -> bool:
    return parse_arch(model).noisy


def data_factor(dataset: str | None, settings: config.Settings) -> tuple[float, float]:
    """(training, test) images of a run's dataset relative to CIFAR-10's."""
    d = dataset or settings.data.dataset
    return (recipe.TRAIN_IMAGES_BY_DATASET[d] / recipe.TRAIN_IMAGES, recipe.TEST_IMAGES_BY_DATASET[d] / recipe.TEST_IMAGES)


def grid_estimate(parts: dict[str, Any], dry: bool) -> dict[str, Any] | None:
    """GPU-hours of the gpu and paper profiles' grids from the train and columns parts (None: nothing measured)."""
    train = parts.get("train", {}).get("result", {})
    measured = {n: f for n, f in (train.get("experiments") or {}).items() if f.get("epoch_wall_s")}
    if not measured or not train.get("train_images"):
        return None
    gpu, paper = config.load(GPU_PARAMS), config.load(ROOT / "params.yaml")
    scale = recipe.TRAIN_IMAGES / train["train_images"]
    unit: dict[bool, float] = {}  # seconds of one PGD-10 epoch of one ResNet20 member, by noisy
    for name, fig in measured.items():
        exp = gpu.experiment(name)
        cost = model_factor(exp.model) * passes(exp.loss, gpu.train.pgd.steps) / passes("pgd_at", gpu.train.pgd.steps)
        unit[noisy(exp.model)] = fig["epoch_wall_s"] * scale / cost
    fallback = statistics.mean(unit.values())
    stacked = best_stacked(parts.get("bench", {}).get("result", {}))
    again = train.get("graphed") or {}
    graphed = again.get("speedup_last_epoch") if again.get("graph_replays") else None  # only if graphs ran
    columns = parts.get("columns", {}).get("result", {})
    per_image = columns.get("total_s") / columns["images"] if columns.get("total_s") and columns.get("images") else None
    audit_per_image = audit_seconds_per_image(columns)
    out: dict[str, Any] = {"dry": dry, "note": "dry run on the CPU: not a GPU figure" if dry else
                           "first-order extrapolation from this report's measured figures",
                           "epoch_s_resnet20_member": {("noisy" if k else "plain"): round(v, 2) for k, v in unit.items()},
                           "assumptions": list(ASSUMPTIONS), "profiles": {}}
    for label, settings in (("gpu", gpu), ("paper", paper)):
        steps = settings.train.pgd.steps
        train_s = sum(settings.train.epochs * unit.get(noisy(e.model), fallback) * model_factor(e.model)
                      * passes(e.loss, steps) / passes("pgd_at", steps) * data_factor(e.dataset, settings)[0]
                      for e in settings.experiments)
        row = {"runs": len(settings.experiments), "epochs": settings.train.epochs, "train_gpu_hours": round(train_s / 3600, 2)}
        if per_image is not None:
            eval_s = sum(per_image * recipe.TEST_IMAGES * len(settings.evaluate.seeds) * model_factor(e.model)
                         * data_factor(e.dataset, settings)[1] for e in settings.experiments)
            row["paper_columns_gpu_hours"] = round(eval_s / 3600, 2)
        if audit_per_image is not None and settings.evaluate.audit:
            audit_s = sum(audit_seconds(settings, e, audit_per_image) for e in settings.experiments)
            row["audit_gpu_hours"] = round(audit_s / 3600, 2)
        if stacked:
            row["train_gpu_hours_stacked"] = round(train_s / 3600 / stacked[1], 2)
        if graphed:
            row["train_gpu_hours_graphed"] = round(train_s / 3600 / graphed, 2)
        out["profiles"][label] = row
    if stacked:
        out["stacked"] = {"k": stacked[0], "speedup": stacked[1]}
    if graphed:
        out["graphed"] = {"experiment": train["graphed"]["experiment"], "speedup": graphed}
    return out


def audit_seconds_per_image(columns: dict[str, Any]) -> dict[str, float] | None:
    """Seconds per test image of each audit attack, from the columns part; None unless each was timed."""
    audit = columns.get("audit") or {}
    if not audit or not columns.get("audit_images") or any("seconds" not in a for a in audit.values()):
        return None
    return {key: a["seconds"] / columns["audit_images"] for key, a in audit.items()}


def audit_seconds(settings: config.Settings, experiment: config.Experiment, per_image: dict[str, float]) -> float:
    """One run's audit time: evaluate's own audit jobs (images x seeds, at each audit eps) as if the model were
    noisy, each at its measured cost per image, x the model factor. An attack the gpu profile did not time (another
    profile's own) is priced at the dearest timed one."""
    from .scoring import plan
    test_images = round(recipe.TEST_IMAGES * data_factor(experiment.dataset, settings)[1])
    jobs, _ = plan(settings.evaluate, test_images, noisy=True)
    dearest = max(per_image.values())
    return sum(per_image.get(job.key.split("@")[0], dearest) * job.n * len(job.seeds)
               for job in jobs if job.audit) * model_factor(experiment.model)


def best_stacked(bench: dict[str, Any]) -> tuple[int, float] | None:
    """(K, speedup) of the largest K >= 2 the bench part measured stacked against sequential, if any (K = 1 is one
    ensemble's members in one pass, not runs stacked)."""
    rows = []
    for key, row in (bench.get("results") or {}).items():
        if not key.startswith("stacked") or row.get("compile_mode") or row.get("variant"):
            continue  # eager stacking only: what train-stacked does unless train.compile or train.cuda_graph is set
        k = int(key.split("_")[0].removeprefix("stacked"))
        if k >= 2:
            rows.append((k, row["speedup"]))
    return max(rows) if rows else None


# --------------------------------------------------------------------------- Markdown
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows), ""]


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report: device and versions, one section per part, the estimate, the failures."""
    parts = report["parts"]
    lines = [f"# GPU check: {report.get('device') or 'device unknown'} ({report['created']})", ""]
    if report["dry"]:
        lines += ["**Dry run on the CPU** (tiny sizes, synthetic data): it tests the check; no figure below is "
                  "a GPU figure.", ""]
    lines += [f"Command: `{report['command']}`; profile `{report['params']}`; budget {report['budget_s']:g} s, "
              f"wall {report['wall_s']:g} s; {'all parts passed' if report['ok'] else '**not all parts passed**'}.", ""]
    if report.get("rendered"):
        r = report["rendered"]
        lines += [f"Rendered from {r['from']} by `{r['by']}` at commit {r['code_commit']}: {r['note']}.", ""]
    lines += _table(["version", "value"], [[k, v] for k, v in report["versions"].items()])
    lines += ["## Parts", ""] + _table(["part", "status", "seconds", "timeout s", "note"], [
        [name, p["status"], p.get("seconds"), p.get("timeout_s"), p.get("reason", "")] for name, p in parts.items()])
    lines += _tests(parts.get("cuda_tests")) + _bench(parts.get("bench")) + _train(parts.get("train"))
    lines += _columns(parts.get("columns")) + _estimate(report.get("estimate"))
    for name, p in parts.items():
        if p.get("error"):
            lines += [f"## {name}: {p['status']}", "", "```", p["error"], "```", ""]
    return "\n".join(lines)


def _tests(part: dict[str, Any] | None) -> list[str]:
    r = (part or {}).get("result", {})
    if not r:
        return []
    lines = ["## CUDA-only tests (`pytest -m cuda`)", "",
             f"{r.get('collected', 0)} collected, {r.get('passed', 0)} passed, {len(r.get('failed', []))} failed, "
             f"{len(r.get('skipped', []))} skipped.", ""]
    return lines + [f"- failed: `{n}`" for n in r.get("failed", [])] + (
        [f"- skipped: {r['skipped'][0]} (and {len(r['skipped']) - 1} more)", ""] if r.get("skipped") else [""])


def _bench(part: dict[str, Any] | None) -> list[str]:
    r = (part or {}).get("result", {})
    if not r.get("results"):
        return []
    rows = []
    for key, row in r["results"].items():
        base, new = list(row)[:2]  # compare() puts the reference and the compared loop first
        st = row["stats"]
        if row.get("variant") == "compiled_graphed":
            key = f"{key} (torch.compile {row['compile_mode']} inside one CUDA graph of the step)"
        elif row.get("compile_mode"):
            key = f"{key} (torch.compile {row['compile_mode']})"
        elif row.get("variant") == "graphed":
            key = f"{key} (whole step as one CUDA graph)"
        rows.append([key, f"{base} {st[base]['median']:,.1f} (±{st[base]['spread_pct']:.0f}%)",
                     f"{new} {st[new]['median']:,.1f} (±{st[new]['spread_pct']:.0f}%)",
                     f"{row['speedup']:.2f}x [{row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}]"])
    setup = r.get("setup", {})
    failed = [f"- failed: {f['row']}: `{f['error'].splitlines()[0][:300]}`" for f in r.get("failed_rows", [])]
    return ["## bench (images/s: median of repeats, spread = (max-min)/median)", "",
            f"Batch {setup.get('batch')}, PGD-{setup.get('pgd_steps')}, {setup.get('warmup')} warm-up + "
            f"{setup.get('repeats')} x {setup.get('timed')} timed steps per loop, loops interleaved; "
            f"{r.get('environment', {}).get('device')}.", ""] + _table(["step", "reference loop", "compared loop",
                                                                         "speedup [range]"], rows) + \
        (failed + [""] if failed else []) + _profiles(r["results"])


def _profiles(results: dict[str, Any]) -> list[str]:
    """The rows' torch.profiler figures (step_profile): kernels per step and the share of the step the device works."""
    rows = [[key, loop, p.get("kernels_per_step"), p.get("busy_ms_per_step"), p.get("wall_ms_per_step"),
             p.get("busy_pct", p.get("error"))]
            for key, row in results.items() for loop, p in (row.get("profile") or {}).items()]
    measured = [p for row in results.values() for p in (row.get("profile") or {}).values() if "steps" in p]
    if not rows:
        return []
    first = measured[0] if measured else {"steps": "-", "counted": "-"}
    return ["### Where a step's time goes (torch.profiler)", "",
            f"{first['steps']} more steps of each loop after timing; counted: {first['counted']}; busy = the union of "
            f"their intervals; wall time includes the profiler's overhead.", ""] + \
        _table(["row", "loop", "kernels per step", "busy ms per step", "wall ms per step", "busy %"], rows)


def _train(part: dict[str, Any] | None) -> list[str]:
    r = (part or {}).get("result", {})
    if not r.get("experiments"):
        return []
    skipped = [f"- {name}: skipped, {f['skipped']}" for name, f in r["experiments"].items() if f.get("skipped")]
    rows = [[f"{name} ({f.get('model')})", f.get("epochs_done"), f.get("val_natural_acc"), f.get("val_pgd_acc"), f.get("train_images_per_s"),
             f.get("epoch_wall_s"), f"{_fmt(f.get('peak_memory_gib'), 2)} GiB ({f.get('memory')})",
             "budget" if f.get("stopped_by_budget") else "done"] for name, f in r["experiments"].items()
            if not f.get("skipped")]
    return [f"## Short training ({r.get('train_images', '?')} training images, up to {r.get('epochs')} epochs)", ""] + \
        _table(["experiment", "epochs", "val natural %", "val PGD %", "train img/s", "epoch s (with val)",
                "peak memory", "ended by"], rows) + (skipped + [""] if skipped else []) + _again(r, "graphed") + \
        _again(r, "compiled") + _stacked(r)


def _stacked(r: dict[str, Any]) -> list[str]:
    """The trained runs again as one stacked network: its epoch against theirs one after another."""
    c = r.get("stacked")
    if not c:
        return []
    head = f"Trained together by `train-stacked` ({' + '.join(c['experiments'])}):"
    if c.get("skipped"):
        return [f"{head} skipped, {c['skipped']}.", ""]
    accuracy = "; ".join(f"{n} val natural {_fmt(a['val_natural_acc'])}%, PGD {_fmt(a['val_pgd_acc'])}%"
                         for n, a in c["accuracy"].items())
    return [f"{head} {_fmt(c.get('epoch_wall_s'), 2)} s per epoch against {_fmt(c.get('sequential_epoch_wall_s'), 2)} s "
            f"one after another (x{_fmt(c.get('speedup'), 2)}), {c.get('epochs_done')} epoch(s); {accuracy}.", ""]


def _again(r: dict[str, Any], key: str) -> list[str]:
    """The first run again with other train settings (a CUDA graph, torch.compile): last epoch against the eager
    run's last epoch."""
    c = r.get(key)
    if not c:
        return []
    changes = c.get("settings") or {"train.compile": c.get("mode")}  # reports before train.cuda_graph: "mode"
    head = f"With `{', '.join(f'{k}: {v}' for k, v in changes.items())}` ({c['experiment']}):"
    if c.get("skipped"):
        return [f"{head} skipped, {c['skipped']}.", ""]
    eager = (r.get("experiments") or {}).get(c["experiment"], {})
    if c.get("graph_failure"):
        head += f" the graph capture FAILED ({c['graph_failure']}), the steps ran eagerly;"
    elif "graph_replays" in c:
        head += f" {c['graph_replays']} steps of its last epoch replayed as one CUDA graph;"
    return [f"{head} last epoch {_fmt(c.get('last_epoch_images_per_s'))} img/s against eager "
            f"{_fmt(eager.get('last_epoch_images_per_s'))} img/s (x{_fmt(c.get('speedup_last_epoch'), 2)}); "
            f"{c.get('epochs_done')} epoch(s), mean {_fmt(c.get('train_images_per_s'))} img/s with the first (compiling or "
            f"capturing) epoch; val natural {_fmt(c.get('val_natural_acc'))}%, PGD {_fmt(c.get('val_pgd_acc'))}% (eager "
            f"{_fmt(eager.get('val_natural_acc'))}%, {_fmt(eager.get('val_pgd_acc'))}%).", ""]


def _columns(part: dict[str, Any] | None) -> list[str]:
    r = (part or {}).get("result", {})
    if not r.get("columns"):
        return []
    rows = [[c["column"], key, c["seconds"], c["images_per_s"], c["accuracy"]] for key, c in r["columns"].items()]
    lines = [f"## Paper columns A1-A4 ({r['images']} test images, one noise seed, {r['amp']}; {r['model']})", ""] + \
        _table(["column", "attack", "seconds", "images/s", "accuracy %"], rows) + [f"Total {_fmt(r.get('total_s'))} s.", ""]
    if r.get("audit"):
        audit = [[key, a.get("seconds"), a.get("images_per_s"), a.get("accuracy"),
                  a.get("skipped") or a.get("failed") or ""] for key, a in r["audit"].items()]
        lines += [f"Audit attacks (evaluate.audit_attacks) on the first {r.get('audit_images')} test images, same "
                  f"model, for their cost per image:", ""] + \
            _table(["attack", "seconds", "images/s", "accuracy %", "not timed"], audit)
    return lines


def _estimate(est: dict[str, Any] | None) -> list[str]:
    if not est:
        return ["## Paper-grid estimate", "", "Not computed: the train part measured no epoch.", ""]
    k = est.get("stacked", {}).get("k")
    g = est.get("graphed", {}).get("speedup")
    rows = [[name, p["runs"], p["epochs"], p["train_gpu_hours"], p.get("train_gpu_hours_stacked"),
             p.get("train_gpu_hours_graphed"), p.get("paper_columns_gpu_hours"), p.get("audit_gpu_hours")]
            for name, p in est["profiles"].items()]
    return ["## Paper-grid estimate", "", f"{est['note']}.", ""] + \
        _table(["profile", "runs", "epochs", "training GPU-hours", f"stacked (K={k or '-'})",
                f"one CUDA graph per step (x{_fmt(g, 2)})", "paper-column GPU-hours", "audit GPU-hours"], rows) + \
        [f"- {a}" for a in est["assumptions"]] + [""]
