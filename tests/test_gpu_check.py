"""gpu-check (issue 14): the dry mode runs every part on the CPU and writes a complete report; a failing or
slow part is reported (fail soft) without stopping the others."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paper_repro import gpu_check, gpu_parts, gpu_report
from paper_repro.gpu_parts import PARTS, Part, columns_model, cuda_test_files, junit_counts
from paper_repro.gpu_report import best_stacked, grid_estimate, markdown

ROOT = Path(__file__).resolve().parents[1]


def gpu_check_cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "paper_repro", "gpu-check", "--out", str(tmp_path / "report"),
                           "--quiet", *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_dry_run_writes_a_complete_report(tmp_path):
    proc = gpu_check_cli(tmp_path, "--dry")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    assert report["kind"] == "gpu-check" and report["dry"] is True and report["ok"] is True
    assert report["params"] == "profiles/gpu/params.yaml" and report["versions"]["torch"] == torch.__version__
    assert list(report["parts"]) == list(PARTS)
    for name, part in report["parts"].items():
        assert part["status"] == "ok" and part["returncode"] == 0 and part["result"], name
        assert (tmp_path / "report" / part["log"]).is_file()
    r = {name: part["result"] for name, part in report["parts"].items()}
    assert r["env"]["device"] and r["env"]["cuda_available"] == torch.cuda.is_available()
    tests = r["cuda_tests"]
    assert tests["collected"] >= 11 and not tests["failed"]
    if not torch.cuda.is_available():
        assert len(tests["skipped"]) == tests["collected"]
    for key, base, new in (("pgd_at_resnet8", "baseline", "ours"), ("stacked2_pgd_at_resnet8", "sequential", "stacked"),
                           ("stacked1_pgd_at_en2resnet8", "sequential", "stacked")):  # an En2's members in one pass
        row = r["bench"]["results"][key]
        assert row["speedup"] > 0 and row[base] == row["stats"][base]["median"]
        assert len(row["stats"][new]["runs"]) == 2 and row["stats"][new]["spread_pct"] >= 0
    assert r["data"]["counts"] == {"train": 100, "test": 20} and r["data"]["official"] is False
    runs = r["train"]["experiments"]
    assert list(runs) == ["resnet20-fp-pgd_at", "en1resnet20-fp-pgd_at"]  # the gpu profile's first experiments
    for run in runs.values():
        assert run["epochs_done"] == 1 and run["val_pgd_acc"] is not None and run["train_images_per_s"] > 0
        assert run["peak_memory_gib"] > 0
    compiled = r["train"]["compiled"]  # the first run again under train.compile (default on the CPU)
    assert compiled["experiment"] == "resnet20-fp-pgd_at" and compiled["settings"] == {"train.compile": "default"}
    assert compiled["epochs_done"] == 1 and compiled["speedup_last_epoch"] > 0
    graphed = r["train"]["graphed"]  # and with train.cuda_graph (eager on the CPU, with a note)
    assert graphed["settings"] == {"train.cuda_graph": True} and graphed["epochs_done"] == 1
    assert "graph_replays" not in graphed and "graphed" not in report["estimate"]  # no graph ran: no estimate
    stacked = r["train"]["stacked"]  # both runs again as one stacked network (they share depth and loss)
    assert stacked["experiments"] == list(runs) and stacked["epochs_done"] == 1 and stacked["speedup"] > 0
    columns = r["columns"]["columns"]
    assert [c["column"] for c in columns.values()] == ["A1", "A2", "A3", "A4"]
    assert r["columns"]["amp"] == "fp32" and r["columns"]["images"] == 20
    assert r["columns"]["model"] == "trained in the train part (en1resnet20-fp-pgd_at)"
    # then each audit attack on a few images (the noisy-only AutoAttack too: en1 is noisy), for the estimate
    audit = r["columns"]["audit"]
    assert list(audit) == ["pgd50_eot", "cw_linf", "autoattack_rand", "autoattack_standard_noise_off"]
    assert r["columns"]["audit_images"] == 4 and all(a["seconds"] > 0 for a in audit.values())
    assert all(p["audit_gpu_hours"] > 0 for p in report["estimate"]["profiles"].values())
    assert set(report["estimate"]["profiles"]) == {"gpu", "paper"} and report["estimate"]["dry"] is True
    md = (tmp_path / "report" / "gpu_check.md").read_text()
    for heading in ("Dry run on the CPU", "## Parts", "## CUDA-only tests", "## bench", "## Short training",
                    "## Paper columns A1-A4", "## Paper-grid estimate"):
        assert heading in md
    assert "With `train.compile: default` (resnet20-fp-pgd_at): last epoch" in md
    assert "With `train.cuda_graph: True` (resnet20-fp-pgd_at): last epoch" in md
    assert "Trained together by `train-stacked` (resnet20-fp-pgd_at + en1resnet20-fp-pgd_at):" in md
    assert "Audit attacks (evaluate.audit_attacks) on the first 4 test images" in md

    # the columns' model when the noisy run did not finish (the first H200 check failed here): its last weights
    part = Part("columns", tmp_path / "report", True, 60.0, gpu_parts.GPU_PARAMS)
    run = tmp_path / "report" / "train" / "en1resnet20-fp-pgd_at"
    for other in run.parent.glob("en1resnet20-*-*"):  # the stacked twin is a finished run too
        if other != run:
            shutil.rmtree(other)
    (run / "INCOMPLETE").touch()
    _, source = columns_model(part, torch.device("cpu"), False)
    assert source.startswith("partly trained in the train part (en1resnet20-fp-pgd_at, not finished: stopped by its "
                             "time budget or diverged; weights of epoch 1)")
    (run / "deployed.safetensors").unlink()
    _, source = columns_model(part, torch.device("cpu"), False)
    assert source.startswith("untrained en1resnet8")


def test_a_failing_part_is_reported_and_its_dependents_skipped(tmp_path):
    proc = gpu_check_cli(tmp_path, "--parts", "data", "train", "columns", "--archive", str(tmp_path / "none.tar.gz"),
                         "--budget-s", "120")
    assert proc.returncode == 1
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    parts = report["parts"]
    assert parts["data"]["status"] == "failed" and "archive not found" in parts["data"]["error"]
    assert parts["train"]["status"] == parts["columns"]["status"] == "skipped"
    assert "needs the data part" in parts["train"]["reason"] and report["ok"] is False
    md = (tmp_path / "report" / "gpu_check.md").read_text()
    assert "## data: failed" in md and "archive not found" in md and "not all parts passed" in md


def test_a_part_over_its_timeout_is_killed_and_reported(tmp_path):
    out = tmp_path / "report"
    for sub in ("parts", "logs"):
        (out / sub).mkdir(parents=True)
    args = argparse.Namespace(params=gpu_check.GPU_PARAMS, dry=True, archive=None, train_experiments=2,
                              train_epochs=3)
    entry = gpu_check.run_part(args, out, "env", timeout=0.3)  # importing torch alone takes longer
    assert entry["status"] == "timeout" and entry["returncode"] is None and "killed after" in entry["error"]
    assert entry["seconds"] < 10


def test_cuda_tests_are_found_and_counted(tmp_path):
    files = {p.name for p in cuda_test_files()}
    assert {"test_attacks.py", "test_models.py", "test_quantizers.py", "test_sparsity.py", "test_stacked.py"} <= files
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="t1"/><testcase classname="a" name="t2">'
                   '<skipped message="needs CUDA"/></testcase><testcase classname="b" name="t3"><failure/></testcase>'
                   '</testsuite></testsuites>')
    assert junit_counts(xml) == {"collected": 3, "passed": 1, "failed": ["b::t3"], "skipped": ["a::t2: needs CUDA"]}


def test_estimate_scales_measured_epochs_to_the_grid():
    """One noisy and one plain ResNet20 epoch of 100 s on the full 45k images: the gpu profile's 31 runs and
    the paper profile's 40."""
    parts = {"train": {"result": {"train_images": 45000, "experiments": {
        "resnet20-fp-pgd_at": {"epoch_wall_s": 100.0}, "en1resnet20-fp-pgd_at": {"epoch_wall_s": 100.0}}}},
        "columns": {"result": {"images": 10000, "total_s": 60.0}}}
    est = grid_estimate(parts, dry=False)
    gpu = est["profiles"]["gpu"]
    # sum over the 31 runs of members x depth factor x passes / 11 (PGD-10: pgd_at 11, tradeoff 12, natural 1):
    # 17 pgd_at member-units, 7 natural runs at 1/11, 16 tradeoff units (En1ResNet56 counts 3) at 12/11
    units = 17 + 7 / 11 + 16 * 12 / 11
    assert gpu["train_gpu_hours"] == pytest.approx(40 * 100 * units / 3600, abs=0.01)
    # the paper profile: the same 31 runs at 200 epochs (5 x), plus the authors' wider grid (issue 16), priced by
    # counted MACs relative to ResNet20 (WRN-34-10 member W, VGG-11 V) and SVHN's 68,257 training images:
    # c100 ResNet20 + En2 + En5 (pgd_at: 1 + 2 + 5), En5WRN34-10 (5 W), En1ResNet110 and En2ResNet56 on CIFAR-100
    # and En2ResNet56 on SVHN with the trade-off loss (6 each, at 12/11; SVHN x 68,257/45,000), 2 VGG-11 natural
    from paper_repro.models import build, count_macs
    r20 = count_macs(build("resnet20"))
    w, v = round(count_macs(build("wrn34-10")) / r20, 2), round(count_macs(build("vgg11")) / r20, 2)
    svhn = 68257 / 45000
    extra = 1 + 2 + 5 + 5 * w + (6 + 6 + 6 * svhn) * 12 / 11 + 2 * v / 11
    paper = est["profiles"]["paper"]
    assert paper["runs"] == 40
    assert paper["train_gpu_hours"] == pytest.approx(5 * gpu["train_gpu_hours"] + 200 * 100 * extra / 3600, abs=0.05)
    # paper columns: 60 s per model and seed, 5 seeds, model factors summing to 40 (27 x 1, En2, En5, 2 x ResNet56);
    # the paper profile adds the wider grid's factors, SVHN's 26,032 test images counting 2.6032 x
    assert gpu["paper_columns_gpu_hours"] == pytest.approx(60 * 5 * 40 / 3600, abs=0.01)
    wider = 1 + 2 + 5 + 5 * w + 6 + 6 + 6 * 2.6032 + 2 * v
    assert paper["paper_columns_gpu_hours"] == pytest.approx(60 * 5 * (40 + wider) / 3600, abs=0.01)
    assert "audit_gpu_hours" not in gpu  # no audit attack timed
    # audit attacks: 2 s per image for the four together; the gpu profile: 1,000 images x 1 seed x 1 eps per run
    # (every run priced as noisy), model factors summing to 40; the paper profile: 5 seeds x 2 eps, its wider grid
    # too (SVHN's larger test set does not change the 1,000 audit images)
    timed = {"pgd50_eot": 150.0, "cw_linf": 50.0, "autoattack_rand": 100.0, "autoattack_standard_noise_off": 100.0}
    parts["columns"]["result"].update(audit_images=200, audit={k: {"seconds": v} for k, v in timed.items()})
    audited = grid_estimate(parts, dry=False)["profiles"]
    assert audited["gpu"]["audit_gpu_hours"] == pytest.approx(2 * 1000 * 40 / 3600, abs=0.01)
    wider_models = 1 + 2 + 5 + 5 * w + 6 + 6 + 6 + 2 * v
    assert audited["paper"]["audit_gpu_hours"] == pytest.approx(2 * 1000 * 10 * (40 + wider_models) / 3600, abs=0.05)
    parts["columns"]["result"]["audit"]["cw_linf"] = {"skipped": "3 s left in the part"}  # part-priced: no estimate
    assert "audit_gpu_hours" not in grid_estimate(parts, dry=False)["profiles"]["gpu"]
    assert grid_estimate({}, dry=False) is None
    assert "Paper-grid estimate" in markdown({"parts": {}, "created": "now", "dry": False, "command": "c",
                                              "params": "p", "budget_s": 1, "wall_s": 1, "ok": False,
                                              "versions": {}, "estimate": est})


def test_time_an_early_part_leaves_unused_passes_to_later_parts():
    """Shares are of the time still left among the parts still to run; the last part gets all that is left."""
    order = list(PARTS)
    assert order[-1] == "bench"  # the part that needed more than its share on the first H200 run
    second = gpu_check.part_timeout(order[1], order[1:], 460.0)
    assert second == pytest.approx(460 * gpu_check.SHARES[order[1]] / sum(gpu_check.SHARES[n] for n in order[1:]))
    assert gpu_check.part_timeout("bench", ["bench"], 250.0) == 250.0
    # columns finishing early: bench's timeout grows with what columns left
    assert gpu_check.part_timeout("bench", ["bench"], 300.0) > gpu_check.part_timeout("columns", ["columns", "bench"], 300.0)


def test_estimate_divides_by_the_largest_measured_stacked_speedup_and_renders_compiled_rows():
    stats = {"median": 1.0, "min": 1.0, "max": 1.0, "spread_pct": 0.0, "runs": [1.0]}
    bench = {"setup": {"batch": 128}, "environment": {"device": "gpu"}, "results": {
        "pgd_at_resnet20": {"baseline": 1.0, "ours": 1.5, "speedup": 1.5, "speedup_range": [1.4, 1.6],
                            "stats": {"baseline": stats, "ours": stats, "compiled": stats}},
        "pgd_at_resnet20_compiled": {"baseline": 1.0, "compiled": 4.2, "speedup": 4.2, "speedup_range": [4, 4.4],
                                     "stats": {"baseline": stats, "ours": stats, "compiled": stats},
                                     "compile_mode": "reduce-overhead"},
        "pgd_at_resnet20_graphed": {"baseline": 1.0, "graphed": 9.0, "speedup": 9.0, "speedup_range": [8, 10],
                                    "stats": {"baseline": stats, "ours": stats, "graphed": stats}, "variant": "graphed"},
        "stacked2_pgd_at_resnet20": {"speedup": 1.6}, "stacked8_pgd_at_resnet20": {"speedup": 4.0},
        "stacked1_pgd_at_en5resnet20": {"speedup": 3.0},  # one ensemble in one pass: not a stack of runs
        "stacked8_pgd_at_resnet20_graphed": {"speedup": 9.5, "variant": "graphed"},
        "stacked4_pgd_at_resnet20": {"speedup": 2.7}}}
    parts = {"train": {"result": {"train_images": 45000, "experiments": {"resnet20-fp-pgd_at": {"epoch_wall_s": 100.0}},
                                  "graphed": {"experiment": "resnet20-fp-pgd_at", "speedup_last_epoch": 2.5,
                                              "graph_replays": 349}}},
             "bench": {"result": bench}}
    est = grid_estimate(parts, dry=False)
    assert est["stacked"] == {"k": 8, "speedup": 4.0}  # eager stacking: what train-stacked does by default
    assert best_stacked({"results": {"stacked1_pgd_at_en5resnet20": {"speedup": 3.0}}}) is None
    assert est["graphed"] == {"experiment": "resnet20-fp-pgd_at", "speedup": 2.5}
    for row in est["profiles"].values():
        assert row["train_gpu_hours_stacked"] == pytest.approx(row["train_gpu_hours"] / 4.0, abs=0.01)
        assert row["train_gpu_hours_graphed"] == pytest.approx(row["train_gpu_hours"] / 2.5, abs=0.01)
    parts["bench"]["result"]["results"] = {k: v for k, v in bench["results"].items() if "stacked" not in k}
    md = markdown({"parts": {"bench": {"status": "ok", **parts["bench"]}}, "created": "now", "dry": False, "command": "c", "params": "p",
                   "budget_s": 1, "wall_s": 1, "ok": True, "versions": {}, "estimate": est})
    assert "| pgd_at_resnet20_compiled (torch.compile reduce-overhead) | baseline 1.0 (±0%) | compiled 1.0" in md
    assert "| pgd_at_resnet20 | baseline 1.0 (±0%) | ours 1.0" in md and "stacked (K=8)" in md
    assert "| pgd_at_resnet20_graphed (whole step as one CUDA graph) | baseline 1.0 (±0%) | graphed 1.0" in md
    assert "one CUDA graph per step (x2.50)" in md


def test_the_recorded_command_carries_no_machine_paths(tmp_path):
    assert gpu_check.portable(str(tmp_path / "report")) == "report"
    assert gpu_check.portable(str(ROOT / "profiles" / "gpu" / "params.yaml")) == "profiles/gpu/params.yaml"
    assert gpu_check.portable("--budget-s") == "--budget-s" and gpu_check.portable("reports/x") == "reports/x"


@pytest.mark.slow
def test_bench_times_our_loop_under_torch_compile(tmp_path):
    """`bench --compile` adds a third loop (ours through torch.compile) measured with the others, and with
    --stacked a third stacked loop (the stacked network compiled), left out of the grid estimate."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "bench", "--models", "resnet8", "--kinds", "pgd_at",
                           "--stacked", "2", "--stacked-model", "resnet8",
                           "--compile", "default", "--batch-size", "8", "--warmup", "2", "--steps", "1",
                           "--repeats", "1", "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    row = doc["results"]["pgd_at_resnet8_compiled"]
    assert doc["setup"]["compile"] == "default" and row["compile_mode"] == "default"
    stacked = doc["results"]["stacked2_pgd_at_resnet8_compiled"]
    assert stacked["compile_mode"] == "default" and stacked["speedup"] > 0 and "stacked_compiled" in stacked["stats"]
    assert gpu_report.best_stacked(doc) == (2, doc["results"]["stacked2_pgd_at_resnet8"]["speedup"])
    assert row["compiled"] > 0 and set(row["stats"]) == {"baseline", "ours", "compiled"}
    assert "speedup_pgd_at_resnet8_compiled=" in proc.stdout


def test_render_rewrites_a_report_made_elsewhere_without_its_machine_folders(tmp_path):
    """A report from a GPU machine: its --out and repository folders are scrubbed, the figures kept."""
    raw = tmp_path / "raw"
    raw.mkdir()
    parts = {"cuda_tests": {"status": "ok", "result": {
        "command": "-m pytest --junitxml=/scratch/gc/parts/x.xml /elsewhere/repo/tests/test_a.py", "collected": 1,
        "passed": 1, "failed": [], "skipped": []}},
        "train": {"status": "ok", "result": {"train_images": 45000, "epochs": 3, "experiments": {
            "resnet20-fp-pgd_at": {"epoch_wall_s": 26.7, "stopped_by_budget": "state saved in /scratch/gc/train/r"}}}}}
    (raw / "gpu_check.json").write_text(json.dumps({
        "kind": "gpu-check", "dry": False, "created": "2026-11-27", "budget_s": 480, "wall_s": 300, "ok": True,
        "params": "profiles/gpu/params.yaml", "device": "NVIDIA H200", "versions": {"torch": "2.11"},
        "command": "python -m paper_repro gpu-check --out /scratch/gc --budget-s 480", "parts": parts}))
    proc = gpu_check_cli(tmp_path, "--render", str(raw), "--root-was", "/elsewhere/repo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "report" / "gpu_check.json").read_text()
    assert "/scratch" not in text and "/elsewhere" not in text
    report = json.loads(text)
    assert report["command"] == "python -m paper_repro gpu-check --out gc --budget-s 480"
    assert report["parts"]["cuda_tests"]["result"]["command"] == "-m pytest --junitxml=<out>/parts/x.xml ./tests/test_a.py"
    assert report["parts"]["train"]["result"]["experiments"]["resnet20-fp-pgd_at"]["epoch_wall_s"] == 26.7
    assert report["estimate"]["profiles"]["gpu"]["train_gpu_hours"] > 0 and "md5" in report["rendered"]["from"]
    assert "Rendered from gpu_check.json md5" in (tmp_path / "report" / "gpu_check.md").read_text()
    assert gpu_check_cli(tmp_path, "--render", str(tmp_path / "none")).returncode != 0


def test_env_gets_its_minimum_and_a_run_that_cannot_fit_one_epoch_is_skipped():
    """From the second H200 run: a 150 s check gave env 8 s (killed), and the train part's second run got a
    share below one epoch, so its always-run first epoch overran the part's timeout."""
    assert gpu_check.part_timeout("env", list(PARTS), 150.0) == 30.0
    assert gpu_check.part_timeout("env", list(PARTS), 12.0) == 12.0  # never more than is left
    r = {"train_images": 45000, "epochs": 1, "experiments": {
        "resnet20-fp-pgd_at": {"model": "resnet20", "epochs_done": 1, "epoch_wall_s": 24.6},
        "en1resnet20-fp-pgd_at": {"model": "en1resnet20", "skipped": "its 20 s share is below one epoch of the run before (~25 s)"}}}
    md = markdown({"parts": {"train": {"status": "ok", "result": r}}, "created": "now", "dry": False, "command": "c",
                   "params": "p", "budget_s": 1, "wall_s": 1, "ok": True, "versions": {}, "estimate": None})
    assert "| resnet20-fp-pgd_at (resnet20) | 1 |" in md and "- en1resnet20-fp-pgd_at: skipped, its 20 s share" in md
    assert "| en1resnet20-fp-pgd_at (" not in md
    est = grid_estimate({"train": {"result": r}}, dry=False)
    assert est is not None and est["profiles"]["gpu"]["train_gpu_hours"] > 0
