"""A training run's state on disk: what a resumed call must share with the run it continues (the
trajectory and its fingerprint), the checkpoints a run saves (never a non-finite tensor), and the run
folder's lifecycle (recovered after a crash, marked INCOMPLETE until train.json, emptied on a fresh start).

Why a module of its own: ``train`` (and ``train_stacked``) is the loop; these rules decide whether its progress
survives a kill, a changed setting or a divergence (issue 17), and tests/test_faults.py exercises them at injected
points. ``open_record`` is where a call meets the folder: recover it, then continue its state or start fresh.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from . import atomic, checkpoint, config
from .config import ConfigError, Experiment, Settings
from .quant import BinaryRelax
from .runtime import RunLock, RunPaths, fault


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good epoch checkpoint is kept."""


class SettingsChanged(ConfigError):
    """--resume found a saved state trained with settings that change the trajectory (exit 2, one line)."""


#: train.* settings that do not change what is computed, only where and how fast: a resume across a
#: change of them continues (and says so). ``amp`` enters the trajectory as its effective value (bf16
#: autocast on or off for the device), ``epochs`` only for the one-cycle schedule (see ``trajectory``).
EXECUTION_SETTINGS = ("device", "amp", "channels_last", "compile", "cuda_graph", "cudnn_benchmark")


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def trajectory(settings: Settings, experiment: Experiment, data_md5: str | None, amp: bool | None = None
               ) -> dict[str, Any]:
    """Every setting that changes the sequence of weights (or the selection), flattened to dotted keys:
    what a resumed run must share with the run it continues. Left out: the execution settings (device,
    channels_last, compile, cuda_graph, and amp except through its effect), and train.epochs under the step schedule,
    whose milestones are absolute epochs, so that a longer run repeats a shorter one epoch for epoch
    (extending train.epochs continues a run). The one-cycle learning rate depends on train.epochs at
    every step, so there it is part of the trajectory. The loss weights and quantizer options enter as their
    changes from the defaults, so a file that writes the defaults out (``params --write``) trains, and resumes,
    the run of a file that left them to the code."""
    train = config.to_dict(settings.train)
    for key in EXECUTION_SETTINGS:
        train.pop(key, None)
    if settings.train.schedule != "onecycle":
        train.pop("epochs", None)
    if amp is None:  # the value on CPU, where only bf16 switches autocast on
        amp = settings.train.amp == "bf16"
    exp = {k: v for k, v in config.to_dict(experiment).items() if k != "twin"}  # evaluation only
    exp.update(config.changed_options(experiment))
    out = {**_flat("train", train), "train.amp (in effect)": bool(amp),
           **_flat("experiment", exp), "data.archive_md5": data_md5,
           "data.val_size": settings.data.val_size, "data.split_seed": settings.data.split_seed}
    return json.loads(json.dumps(out, sort_keys=True))  # as it reads back from a sidecar


def fingerprint(settings: Settings, experiment: Experiment, data_md5: str | None, amp: bool | None = None) -> str:
    """Hash of ``trajectory``: equal fingerprints, same training."""
    blob = json.dumps(trajectory(settings, experiment, data_md5, amp), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def legacy_fingerprint(settings: Settings, experiment: Experiment, data_md5: str | None) -> str:
    """The fingerprint of states saved before issue 17 (every train.* setting): such a state resumes
    only under exactly its settings, as before."""
    blob = json.dumps({"train": config.to_dict(settings.train), "experiment": config.to_dict(experiment),
                       "data": data_md5, "val": [settings.data.val_size, settings.data.split_seed]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def execution(settings: Settings, device: torch.device) -> dict[str, Any]:
    """The execution settings of this call (recorded in the state; compared, not required, on resume)."""
    t = settings.train
    return {"device": device.type, **{f"train.{k}": getattr(t, k) for k in EXECUTION_SETTINGS}}


def resume_notes(saved: dict[str, Any], traj: dict[str, Any], legacy_fp: str, settings: Settings,
                 exec_now: dict[str, Any], state: Path) -> tuple[list[str], list[str]]:
    """(differences that change the trajectory, notes to print) between a saved state and this call."""
    t = settings.train
    done = int(saved.get("epochs_done", 0))
    diffs: list[str] = []
    if "trajectory" in saved:
        old = saved["trajectory"]
        for key in sorted(set(old) | set(traj)):
            if old.get(key, "<unset>") != traj.get(key, "<unset>"):
                diffs.append(f"{key}: {old.get(key, '<unset>')!r} -> {traj.get(key, '<unset>')!r}")
        if t.schedule == "onecycle" and any(d.startswith("train.epochs:") for d in diffs):
            diffs.append("(the one-cycle learning rate depends on train.epochs at every step, so the finished "
                         "epochs followed another schedule)")
    elif saved.get("fingerprint") != legacy_fp:
        diffs.append("settings differ from those of a state saved by an earlier version (not itemised: it "
                     "recorded only their hash)")
    if not diffs and done > t.epochs:
        diffs.append(f"train.epochs is {t.epochs} but {done} epochs are finished (raise train.epochs to >= {done})")
    notes = []
    before = saved.get("epochs")
    if not diffs and before is not None and before != t.epochs:
        notes.append(f"train.epochs {before} -> {t.epochs}: continuing after epoch {done}; the step schedule's "
                     f"milestones {list(t.milestones)} are absolute epochs, so the finished epochs are exactly those "
                     f"of a {t.epochs}-epoch run and the remaining ones follow that run's schedule")
    old_exec = saved.get("execution") or {}
    changed = [f"{k}: {old_exec[k]!r} -> {v!r}" for k, v in exec_now.items() if k in old_exec and old_exec[k] != v]
    if not diffs and changed:
        notes.append(f"execution settings differ from the saved state's ({'; '.join(changed)}): they do not change "
                     f"the training trajectory (results may differ in floating-point rounding); continuing")
    return diffs, notes


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one device sync)."""
    names = [k for k, v in tensors.items() if v.is_floating_point()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).cpu()
    return [k for k, good in zip(names, ok.tolist()) if not good]


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Parameters, buffers (BatchNorm statistics) and momentum buffers: what the resume state holds."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"optimizer.{i}.momentum_buffer"] = buf
    return tensors


def momentum_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A momentum buffer holding ``value`` laid out as ``param`` (channels_last convs stay channels_last): the fused
    SGD of CUDA requires a parameter, its gradient and its momentum to share strides, and a saved or stacked buffer
    comes back contiguous."""
    return torch.empty_like(param, memory_format=torch.preserve_format).copy_(value)


def _require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = non_finite(tensors)
    if bad:  # never reached after the check in train(); a last guard that nothing non-finite is written
        raise TrainingDiverged(f"refusing to save {what}: non-finite {', '.join(bad[:3])}")


def _steps(which: str, epoch: int | None) -> Any:
    return None if epoch is None else (lambda step: fault(f"{which}-{step}", epoch))


def save_state(paths: RunPaths, model: torch.nn.Module, optimizer: torch.optim.Optimizer, relax: BinaryRelax,
               record: dict[str, Any], epoch: int | None = None) -> None:
    tensors = state_tensors(model, optimizer)
    _require_finite(tensors, f"the resume state {paths.state}")
    checkpoint.save(paths.state, tensors, {**record, "relax": relax.state_dict(), "kind": "resume-state"},
                    on_step=_steps("state", epoch))


def load_state(paths: RunPaths, model: torch.nn.Module, optimizer: torch.optim.Optimizer, relax: BinaryRelax,
               device: torch.device) -> dict[str, Any]:
    tensors, record = checkpoint.load(paths.state, device=device)
    bad = non_finite(tensors)
    if bad:
        raise ResumeError(f"the saved state {paths.state} holds non-finite values ({', '.join(bad[:3])}): it cannot be "
                          f"continued; rerun with --restart to start again")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        key = f"optimizer.{i}.momentum_buffer"
        if key in tensors:
            optimizer.state[p]["momentum_buffer"] = momentum_like(p, tensors[key])
    relax.load_state_dict(record["relax"])
    return record


def save_selected(paths: RunPaths, model: torch.nn.Module, relax: BinaryRelax, sidecar: dict[str, Any],
                  epoch: int | None = None) -> None:
    weights, deployed = model.state_dict(), relax.deployed_tensors()
    _require_finite({**weights, **{f"deployed.{k}": v for k, v in deployed.items()}}, "the selected model")
    checkpoint.save(paths.float_weights, weights, {**sidecar, "kind": "float"}, on_step=_steps("float", epoch))
    checkpoint.save(paths.deployed, deployed, {**sidecar, "kind": "deployed"}, on_step=_steps("deployed", epoch))


class ResumeError(ConfigError):
    """--resume cannot continue the saved state (unreadable or non-finite); --restart starts again."""


def recover_folder(paths: RunPaths) -> list[str]:
    """After a crash: finish or drop interrupted checkpoint saves, delete temp files of interrupted
    writes. Called with the run lock held."""
    notes = [n for ck in (paths.state, paths.float_weights, paths.deployed) if ck.parent.is_dir()
             for n in [checkpoint.recover(ck)] if n]
    removed = atomic.remove_temporaries(paths.root)
    if removed:
        notes.append(f"removed {len(removed)} temporary file(s) of interrupted writes: "
                     f"{', '.join(str(r) for r in removed[:3])}{'...' if len(removed) > 3 else ''}")
    return notes


def start_fresh(paths: RunPaths, name: str) -> None:
    """Mark the folder incomplete, then remove the previous run's files (state, selected models,
    train.json): from here on it holds this run's files only."""
    mark_incomplete(paths, name)
    for out in paths.outputs():
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink(missing_ok=True)
    for leftover in paths.root.glob(".*.pending"):
        leftover.unlink(missing_ok=True)


def mark_incomplete(paths: RunPaths, name: str) -> None:
    if not paths.incomplete.is_file():
        atomic.write_text(paths.incomplete, f"{paths.root} does not hold a finished training of {name} (in progress, "
                                            f"stopped or diverged): continue it with `python -m paper_repro train -e "
                                            f"{name} --resume`; evaluate refuses this folder until then\n")


def last_good(paths: RunPaths, record: dict[str, Any]) -> str:
    """What a diverged run keeps on disk (what the state file really holds)."""
    done = record["epochs_done"]
    if done == 0:
        return ("no epoch finished with finite weights, so nothing is saved; lower train.lr or check the data, "
                "then train again")
    best = record.get("best")
    selected = f"; the selected model ({paths.deployed}) is epoch {best['epoch']}" if best else ""
    return (f"the last good state is the end of epoch {done} ({paths.state}, all finite){selected}; lower train.lr "
            f"or check the data, then rerun with --resume --restart")


# --------------------------------------------------------------------------- opening a run (lock held)
def open_record(paths: RunPaths, experiment: Experiment, settings: Settings, lock: RunLock, md5: str | None, amp: bool,
                exec_now: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, relax: BinaryRelax,
                device: torch.device, *, resume: bool, restart: bool) -> dict[str, Any]:
    """The run's record to continue (its state loaded into model/optimizer/relax) or a fresh one (the folder
    emptied); the folder is marked INCOMPLETE either way. Called with the run lock held."""
    if lock.took_over:
        print(lock.took_over, flush=True)
    for note in recover_folder(paths):
        print(note, flush=True)
    traj = trajectory(settings, experiment, md5, amp)
    record = resumed_record(paths, experiment, settings, traj, exec_now, model, optimizer, relax, device,
                            resume=resume, restart=restart)
    if record is None:
        record = {"epochs_done": 0, "history": [], "best": None, "wall_s": 0.0}
        start_fresh(paths, experiment.name)
    else:
        mark_incomplete(paths, experiment.name)
    record.update(fingerprint=fingerprint(settings, experiment, md5, amp), trajectory=traj, epochs=settings.train.epochs,
                  execution=exec_now)
    if (record.get("best") or {}).get("fallback"):  # an extended run may now reach phase 2
        record["best"] = None
    return record


def resumed_record(paths: RunPaths, experiment: Experiment, settings: Settings, traj: dict[str, Any],
                   exec_now: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   relax: BinaryRelax, device: torch.device, *, resume: bool, restart: bool) -> dict[str, Any] | None:
    """The saved record, loaded into model/optimizer/relax, when this call continues it; None: start
    from scratch. Never discards finished epochs under --resume without --restart."""
    side = checkpoint.sidecar_path(paths.state)
    if not (paths.state.is_file() or side.is_file()):
        return None
    try:
        saved = checkpoint.read_sidecar(paths.state)
        done = int(saved.get("epochs_done", 0))
    except checkpoint.CheckpointError as err:
        saved, done = None, None
        problem = str(err)
    if not resume:
        if done:
            print(f"starting {experiment.name} from scratch: discarding the {done} finished epoch(s) in {paths.state} "
                  f"(train --resume continues them)", flush=True)
        return None
    if saved is not None:
        diffs, notes = resume_notes(saved, traj, legacy_fingerprint(settings, experiment, traj["data.archive_md5"]),
                                    settings, exec_now, paths.state)
        if diffs:
            what = "; ".join(diffs)
            if not restart:
                raise SettingsChanged(f"{experiment.name}: the saved state ({done} finished epoch(s), {paths.state}) was "
                                      f"trained with settings that change the training: {what}; restore them to "
                                      f"continue, or rerun with --resume --restart to discard those epochs and start again")
            print(f"--restart: {experiment.name}: settings differ from the saved state's ({what}): discarding its {done} "
                  f"finished epoch(s) and starting again", flush=True)
            return None
        try:
            record = load_state(paths, model, optimizer, relax, device)
        except (checkpoint.CheckpointError, ResumeError) as err:
            problem = str(err).split("; rerun with")[0]
        else:
            for note in notes:
                print(f"note: {note}", flush=True)
            print(f"resuming {experiment.name} after epoch {record['epochs_done']}", flush=True)
            return record
    if not restart:
        raise ResumeError(f"cannot resume {experiment.name}: {problem}; rerun with --resume --restart to discard the "
                          f"saved state and start again")
    print(f"--restart: the saved state of {experiment.name} cannot be read ({problem}): starting again", flush=True)
    return None
