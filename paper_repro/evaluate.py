"""``evaluate``: one trained run -> ``metrics/<run>.json`` (+ ``metrics/<run>.examples.npz``).

Everything is measured on the deployed weights (``runs/<run>/deployed.safetensors``: Q(W) for the
quantized tensors) in the model rebuilt from the sidecar's ``arch``/``arch_config``. The EnResNet is a
randomized defense (its noise stays on, as in the reference), so each accuracy is repeated over
``evaluate.seeds``: before every (attack, seed) the noise streams restart with ``model.seed_noise(seed)``
and the attack's own randomness comes from a ``torch.Generator`` seeded from (seed, attack); on one
device a re-run gives the same numbers. Spread: sample std over seeds and a 95% t-interval over seeds
(``ci95``; Wilson when one seed ran), plus the Wilson interval of the test-set sampling
(``ci95_wilson``). The schema is documented in docs/contracts.md ("metrics") and checked by
``validate_metrics`` before anything is written; files are written to a temp name and renamed.
Kept whole (~400 lines): it is the stage that assembles one metrics document, from loading the run to
writing the metrics/examples pair; the measuring itself lives in scoring.py, the schema in metrics_schema.py.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import atomic, checkpoint, config, sanity
from .config import ConfigError, EvaluateSettings, Experiment, Settings
from .data import load_prepared, provenance
from .loader import pick_device
from .models import build
from .metrics_schema import SCHEMA_VERSION, validate_metrics
from .runtime import RunPaths, channels_last_for, device_name
from .scoring import AutocastLogits, Job, Scorer, check_settings, eps_label, noise_active, plan, run_job

SMALL_WEIGHT_THRESHOLD = 1e-3  # |w| below this counts as small (sibling paper, paper-spec section 8)


# --------------------------------------------------------------------------- loading
def load_run(run_dir: Path, device: torch.device, channels_last: bool = False,
             allow_incomplete: bool = False) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    """The deployed model (eval mode, on ``device``), its tensors (CPU) and sidecar; refuses a run folder
    that does not hold one finished training (marked INCOMPLETE by train) unless ``allow_incomplete`` (timing
    only: the weights of the last epoch a stopped run selected)."""
    paths = RunPaths(Path(run_dir))
    if paths.incomplete.is_file() and not allow_incomplete:
        raise ConfigError(f"{run_dir} holds no finished training (marked {paths.incomplete.name}: in progress, stopped "
                          f"or diverged): finish it with `python -m paper_repro train --resume`, then evaluate")
    path = paths.deployed
    tensors, sidecar = checkpoint.load(path, "cpu")
    if "arch" not in sidecar:
        raise checkpoint.CheckpointError(f"{checkpoint.sidecar_path(path)} has no 'arch': cannot rebuild the model")
    model = build(sidecar["arch"], **sidecar.get("arch_config", {}))
    checkpoint.load_into(model, path, tensors, sidecar)
    tensors = {name: tensors[name] for name in model.state_dict()}  # model order: reports repeat exactly
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, tensors, sidecar


IDENTITY_FIELDS = ("model", "quantizer", "quantizer_options", "method", "loss", "loss_params", "noise")


def expected_identity(experiment: Experiment) -> dict[str, Any]:
    """What a run folder of ``experiment`` must have been trained as (the sidecar's fields)."""
    return {"model": experiment.model, "quantizer": experiment.quantizer,
            "quantizer_options": dict(experiment.quantizer_options),
            "method": experiment.method if experiment.quantized else "none", "loss": experiment.loss,
            "loss_params": experiment.resolved_loss_params(), "noise": experiment.noise}


def check_identity(experiment: Experiment, sidecar: Mapping[str, Any], run_dir: Path) -> None:
    """The run folder must hold what params.yaml says the experiment is: the whole experiment
    (model, quantizer and its options, method, loss and its weights, noise); a missing key is a mismatch."""
    for key, value in expected_identity(experiment).items():
        if key not in sidecar:
            raise ConfigError(f"{run_dir}: its sidecar does not record {key!r}, so it cannot be shown to be "
                              f"experiment {experiment.name}: retrain it")
        have = sidecar[key]
        if key == "loss_params":
            have = {k: float(v) for k, v in (have or {}).items()}
        if have != value:
            raise ConfigError(f"experiments.{experiment.name}.{key} is {value!r} but {run_dir} was trained with "
                              f"{have!r}: retrain or evaluate the matching experiment")


def find_twin(settings: Settings, experiment: Experiment) -> Experiment | None:
    """The float twin the params name (declared as runs/<twin> in dvc.yaml), else config.float_twin's, or None."""
    name = experiment.twin or config.float_twin(settings.experiments, experiment)
    return None if name == experiment.name else settings.experiment(name)


def load_twin(settings: Settings, experiment: Experiment, run_dir: Path, device: torch.device,
              channels_last: bool = False) -> tuple[nn.Module | None, str]:
    """(twin model or None, a note: its name, or why there is none)."""
    if not experiment.quantized:
        return None, "This run is itself full precision; the transfer check applies to quantized runs."
    twin = find_twin(settings, experiment)
    if twin is None:
        return None, (f"No float twin in params.yaml (model {experiment.model}, loss {experiment.loss}, "
                      f"quantizer none).")
    twin_dir = Path(run_dir).parent / twin.name
    if not RunPaths(twin_dir).deployed.is_file():
        return None, f"The float twin {twin.name} has no trained run at {twin_dir}."
    model, _, _ = load_run(twin_dir, device, channels_last)
    return model, twin.name


# --------------------------------------------------------------------------- the evaluation
def evaluate_run(settings: Settings, experiment: Experiment, run_dir: Path, out_path: Path,
                 quiet: bool = False) -> dict[str, Any]:
    """Evaluate ``run_dir`` (deployed weights) and write ``out_path`` plus its examples file; returns the metrics."""
    started = time.perf_counter()
    ev = settings.evaluate
    check_settings(ev)
    run_dir, out_path = Path(run_dir), Path(out_path)
    device = pick_device(ev.device)
    channels_last = channels_last_for(device, settings)
    base, tensors, sidecar = load_run(run_dir, device, channels_last)
    check_identity(experiment, sidecar, run_dir)
    amp = ev.amp == "bf16" or (ev.amp == "auto" and device.type == "cuda")
    model = AutocastLogits(base, device.type) if amp else base
    data = load_prepared(settings.data.prepared, experiment.dataset)
    x_test, y_test = torch.as_tensor(data.x_test), torch.as_tensor(data.y_test).long()
    noisy = noise_active(base)
    jobs, skipped_attacks = plan(ev, len(y_test), noisy)
    scorer = Scorer(model, device, ev.batch_size, quiet, channels_last)
    load_s = time.perf_counter() - started

    accuracy: dict[str, dict[str, Any]] = {}
    examples: dict[str, np.ndarray] = {}
    for job in jobs:
        entry, correct = run_job(scorer, job, x_test, y_test, noisy)
        accuracy[job.key], examples[job.key] = entry, correct

    sanity_start = time.perf_counter()
    flags = run_sanity(settings, experiment, run_dir, scorer, x_test, y_test, device, amp, accuracy)
    sanity_s = time.perf_counter() - sanity_start
    layers_doc, size_doc, packed = weights_report(ev, experiment.name, base, tensors, sidecar, out_path)
    flags["deployed_weights_quantized"] = sanity.judge_levels(
        layers_doc["layers"] if sidecar.get("quantized") else [], sidecar.get("quantizer", "none"),
        **(sidecar.get("quantizer_options") or {}))

    metrics = assemble(settings, experiment, run_dir, sidecar, data.meta, jobs, accuracy, skipped_attacks, flags,
                       layers_doc, size_doc, packed, device, out_path, noisy, amp)
    metrics["timing"] = {"load_s": round(load_s, 2), "attacks_s": {k: v["seconds"] for k, v in accuracy.items()},
                         "sanity_s": round(sanity_s, 2), "total_s": round(time.perf_counter() - started, 2)}
    validate_metrics(metrics)
    blob = examples_bytes(examples, accuracy, y_test[:max((j.n for j in jobs), default=0)])
    metrics["examples"]["md5"] = hashlib.md5(blob).hexdigest()
    write_pair(examples_path(out_path), blob, out_path, metrics)
    return metrics


def run_sanity(settings: Settings, experiment: Experiment, run_dir: Path, scorer: Scorer, x_test: Tensor,
               y_test: Tensor, device: torch.device, amp: bool,
               accuracy: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The gradient-masking checks (sanity.py) on the first ``sanity_examples`` test images, one seed."""
    ev = settings.evaluate
    flags: dict[str, dict[str, Any]] = {}
    if ev.sanity:
        n = min(ev.sanity_examples or len(y_test), len(y_test))
        x, y = x_test[:n], y_test[:n]
        twin, note = load_twin(settings, experiment, run_dir, device, scorer.channels_last)
        if twin is not None:
            twin = AutocastLogits(twin, device.type) if amp else twin
            twin.seed_noise(ev.sanity_seed)

        def score(attack: sanity.AttackFn, name: str) -> float:
            with tqdm(total=scorer.batches(n), desc=name, unit="batch", disable=scorer.quiet, leave=False) as bar:
                return 100.0 * float(scorer.correct(x, y, attack, ev.sanity_seed, name, bar=bar).mean())

        flags.update(sanity.run_checks(score, n, ev, twin, note))
    else:
        for name in ("more_steps_not_weaker", "eps_sweep_to_zero", "blackbox_not_stronger", "transfer_not_stronger"):
            flags[name] = sanity.skipped("evaluate.sanity is false.")
    flags["iterative_not_weaker"] = sanity.judge_single_step(accuracy.get("fgsm"), accuracy.get("ifgsm20"),
                                                             ev.sanity_tolerance)
    return flags


def weights_report(ev: EvaluateSettings, run: str, model: nn.Module, tensors: Mapping[str, Tensor],
                   sidecar: Mapping[str, Any], out_path: Path) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """Sparsity (quant.summary) and size (quant.size_report) of the deployed tensors; optional packed export.

    Full-precision runs: sparsity over the tensors the reference rule WOULD quantize (measured exact
    zeros, normally 0) and size with nothing packed (compression 1.0).
    """
    from .quant import save_packed, select_quantized, size_report, summary

    quantized = list(sidecar.get("quantized") or [])
    scheme = sidecar.get("quantizer", "none")
    opts = dict(sidecar.get("quantizer_options") or {})
    names = quantized or select_quantized(model)
    doc = summary(tensors, names)
    doc = {**_rounded(doc), "selection": "quantized tensors" if quantized else
           "reference rule (3x3 convs incl. stem), not quantized in this run"}
    size = _rounded(size_report(tensors, quantized, None if not quantized else scheme, **opts))
    size["scheme"] = scheme
    packed = None
    if ev.export_packed and quantized:
        target = out_path.parent / "packed" / f"{run}.safetensors"
        save_packed(target, tensors, quantized, scheme, meta={"run": run, "arch": sidecar.get("arch")}, **opts)
        packed = str(target)
    return doc, size, packed


def init_sparsity(sidecar: Mapping[str, Any]) -> dict[str, Any] | None:
    """Sparsity of the same quantizer applied to the network at initialisation (same architecture and
    training seed): what a quantizer gives by construction, before training (ternary zeroes about 42%
    and 4-bit about 23% of Gaussian weights). The baseline a trained model's sparsity is judged against."""
    from .quant import project, summary

    quantized = list(sidecar.get("quantized") or [])
    if not quantized:
        return None
    scheme, opts = sidecar.get("quantizer", "none"), dict(sidecar.get("quantizer_options") or {})
    train_seed = int((sidecar.get("train") or {}).get("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_seed)
        fresh = build(sidecar["arch"], **sidecar.get("arch_config", {}))
    state = {k: v.detach() for k, v in fresh.state_dict().items()}
    tensors = {k: (project(v, scheme, **opts) if k in quantized else v) for k, v in state.items()}
    doc = summary(tensors, quantized)
    layers = [{"name": r["name"], "numel": r["numel"], "nnz": r["nnz"]} for r in doc["layers"]]  # C1 pairs layers
    return _rounded({"weight": doc["weight"], "channel": doc["channel"], "filter": doc["filter"],
                     "counts": doc["counts"], "layers": layers, "train_seed": train_seed,
                     "note": "quantizer applied to the untrained network (same architecture and seed)"})


def small_weights(run_dir: Path, threshold: float = SMALL_WEIGHT_THRESHOLD) -> dict[str, Any] | None:
    """Share of float conv weights (4-D tensors of the selected epoch's W) with |w| < threshold: the
    sibling paper's statistic (8.66% after natural vs 3.64% after adversarial training, ResNet20)."""
    path = RunPaths(run_dir).float_weights
    if not path.is_file():
        return None
    tensors, _ = checkpoint.load(path, "cpu")
    kernels = [t for t in tensors.values() if t.ndim == 4]
    total = sum(t.numel() for t in kernels)
    if not total:
        return None
    small = sum(int((t.abs() < threshold).sum()) for t in kernels)
    return {"threshold": threshold, "share": round(100.0 * small / total, 2), "count": small, "total": total,
            "tensors": "float W of the selected epoch, conv kernels (4-D)"}


def training_record(sidecar: Mapping[str, Any], train_summary: Mapping[str, Any]) -> dict[str, Any]:
    """How the model was trained, as it was in effect: the recipe fingerprint verify compares with the
    paper's, the selection rule and whether a quantized run ever trained quantized (phase 2)."""
    selected = dict(sidecar.get("selected") or train_summary.get("selected") or {})
    history = train_summary.get("history") or []
    phase2 = train_summary.get("phase2_epochs")
    if phase2 is None and history:
        phase2 = sum(1 for h in history if h.get("phase") == 2)
    quantized = bool(sidecar.get("quantized"))
    return {
        "settings": dict(sidecar.get("train") or {}),
        "amp_in_effect": sidecar.get("amp_in_effect", train_summary.get("amp_in_effect")),  # None: not recorded
        "split": dict(sidecar.get("split") or {}),
        "selection_metric": sidecar.get("selection_metric") or selected.get("metric"),
        "selected": selected,
        "epochs_done": len(history) if history else None,
        "phase2_epochs": phase2,
        "trained_quantized": (not quantized) or bool(phase2),
        "wall_s": train_summary.get("wall_s"),
    }


def _rounded(obj: Any, digits: int = 4) -> Any:
    """Floats rounded (sparsity/size percentages and ratios), structure kept."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, digits) for v in obj]
    return obj


def assemble(settings: Settings, experiment: Experiment, run_dir: Path, sidecar: Mapping[str, Any],
             data_meta: Mapping[str, Any], jobs: Sequence[Job], accuracy: dict[str, Any],
             skipped_attacks: dict[str, str],
             flags: dict[str, Any], sparsity: dict[str, Any], size: dict[str, Any], packed: str | None,
             device: torch.device, out_path: Path, noisy: bool, amp: bool) -> dict[str, Any]:
    """The metrics document (docs/contracts.md, "metrics"); ``amp``: whether the evaluation ran under bf16 autocast
    (evaluate.amp as resolved on ``device``)."""
    import torchattacks

    ev = settings.evaluate
    train_profile = sidecar.get("profile", settings.profile)
    profile = settings.profile if settings.profile != "paper" or train_profile == "paper" else train_profile
    summary_path = RunPaths(run_dir).summary
    train_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    train_cfg = sidecar.get("train") or {}
    data_doc = provenance(dict(data_meta))
    trained_on = (sidecar.get("data") or {}).get("archive_md5")
    paper_eps = sorted({j.eps for j in jobs if not j.audit and j.eps > 0})
    audit_jobs = [j for j in jobs if j.audit]
    return {
        "schema_version": SCHEMA_VERSION, "run": experiment.name, "profile": profile,
        "model": sidecar.get("model", experiment.model), "quantizer": sidecar.get("quantizer", experiment.quantizer),
        "quantizer_options": dict(sidecar.get("quantizer_options") or {}),
        "method": sidecar.get("method", experiment.method if experiment.quantized else "none"),
        "loss": sidecar.get("loss", experiment.loss),
        "loss_params": dict(sidecar.get("loss_params") or experiment.resolved_loss_params()),
        "noise": bool(sidecar.get("noise", experiment.noise)),
        "noise_active": noisy,
        "n_examples": max((j.n for j in jobs if not j.audit), default=0), "n_requested": ev.n_examples,
        "seeds": list(ev.seeds),
        "eps": {"paper": paper_eps[0] if len(paper_eps) == 1 else paper_eps,
                "audit": list(ev.audit_eps) if audit_jobs else [],
                "audit_labels": [eps_label(e) for e in ev.audit_eps] if audit_jobs else [],
                "note": "0.031 is slightly below 8/255 = 0.03137"},
        "audit": {"enabled": ev.audit, "n_examples": audit_jobs[0].n if audit_jobs else 0,
                  "seeds": list(audit_jobs[0].seeds) if audit_jobs else []},
        "accuracy": accuracy,
        "skipped": skipped_attacks,
        "sanity": flags,
        "sparsity": sparsity,
        "sparsity_at_init": init_sparsity(sidecar),
        "small_weights": small_weights(run_dir),
        "training": training_record(sidecar, train_summary),
        "size": size,
        "packed": packed,
        "data": {**data_doc, "n_eval": max((j.n for j in jobs), default=0),
                 "subset": "the first n images of the prepared test split",
                 "same_as_training": trained_on == data_doc.get("archive_md5") if trained_on else None},
        "provenance": {
            "epochs": train_summary.get("epochs", train_cfg.get("epochs")), "train_seed": train_cfg.get("seed"),
            "train_profile": train_profile, "selected": sidecar.get("selected"),
            "versions": sidecar.get("versions"), "device": sidecar.get("device"), "platform": sidecar.get("platform"),
            "wall_s": train_summary.get("wall_s"), "weights_sha256": sidecar.get("weights_sha256"),
            "deployed": str(RunPaths(run_dir).deployed),
            "eval_device": device_name(device), "eval_versions": {**checkpoint.versions(),
                                                                  "torchattacks": torchattacks.__version__,
                                                                  "numpy": np.__version__},
        },
        "examples": {"file": examples_path(out_path).name, "arrays": {k: npz_key(k) for k in accuracy},
                     "layout": "bool (len(seeds), n): correct after the attack; 'y' the labels, 'index' the "
                               "test-set indices"},
        "settings": config.to_dict(ev),
        "amp_in_effect": bool(amp),
    }


# --------------------------------------------------------------------------- files
def examples_path(out_path: Path) -> Path:
    name = out_path.name[:-5] if out_path.name.endswith(".json") else out_path.name
    return out_path.with_name(f"{name}.examples.npz")


def npz_key(attack: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=+-]", "_", attack)


def examples_bytes(examples: Mapping[str, np.ndarray], accuracy: Mapping[str, Mapping[str, Any]],
                   y: Tensor) -> bytes:
    """Per-example correctness, one bool (seeds, n) array per attack; loadable with allow_pickle=False."""
    arrays: dict[str, np.ndarray] = {"y": y.numpy().astype(np.int64), "index": np.arange(len(y), dtype=np.int64)}
    for key, correct in examples.items():
        arrays[npz_key(key)] = correct.astype(bool)
        arrays[f"{npz_key(key)}.seeds"] = np.asarray(accuracy[key]["seeds"], dtype=np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def write_pair(examples_file: Path, blob: bytes, metrics_file: Path, metrics: Mapping[str, Any]) -> None:
    """The examples file and the metrics that describe it, as a pair: both are serialised before either is
    written (a failure to serialise writes nothing), the metrics name the examples' md5 (a pair from two runs
    is detectable), and the old metrics go first, so a failure in between leaves no metrics describing
    other examples: evaluate then simply reruns."""
    text = json.dumps(metrics, allow_nan=False, indent=1) + "\n"
    metrics_file.unlink(missing_ok=True)
    atomic.write_bytes(examples_file, blob)
    atomic.write_text(metrics_file, text)


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", "-e", required=True, help="name of an entry of params.yaml's experiments")
    p.add_argument("--run-dir", type=Path, help="trained run folder (default: runs/<experiment>)")
    p.add_argument("--out", type=Path, help="metrics file (default: metrics/<experiment>.json)")


def main(args: argparse.Namespace) -> int:
    if not args.experiment:
        raise ConfigError("evaluate needs --experiment NAME")
    settings = config.load(args.params, args.overrides)
    experiment = settings.experiment(args.experiment)
    run_dir = args.run_dir or Path("runs") / experiment.name
    out = args.out or Path("metrics") / f"{experiment.name}.json"
    try:
        metrics = evaluate_run(settings, experiment, run_dir, out, quiet=args.quiet)
    except checkpoint.CheckpointError as err:
        raise ConfigError(f"{err} (train it first: python -m paper_repro train -e {experiment.name})") from None
    for key, e in metrics["accuracy"].items():
        spread = f" +- {e['std']:.2f}" if e["std"] is not None else ""
        print(f"{key:>36}: {e['mean']:6.2f}%{spread} (n={e['n']}, {len(e['seeds'])} seeds, {e['seconds']:.1f}s)")
    failed = [k for k, v in metrics["sanity"].items() if v["passed"] is False]
    print(f"sanity: {'all passed' if not failed else 'FAILED ' + ', '.join(failed)}; "
          f"wrote {out} in {metrics['timing']['total_s']:.1f}s")
    return 0
