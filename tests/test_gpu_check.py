"""gpu-check (issue 14): the dry mode runs every part on the CPU and writes a complete report; a failing or
slow part is reported (fail soft) without stopping the others."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paper_repro import gpu_check
from paper_repro.gpu_parts import PARTS, cuda_test_files, junit_counts
from paper_repro.gpu_report import grid_estimate, markdown

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
    for key, base, new in (("pgd_at_resnet8", "baseline", "ours"), ("stacked2_pgd_at_resnet8", "sequential", "stacked")):
        row = r["bench"]["results"][key]
        assert row["speedup"] > 0 and row[base] == row["stats"][base]["median"]
        assert len(row["stats"][new]["runs"]) == 2 and row["stats"][new]["spread_pct"] >= 0
    assert r["data"]["counts"] == {"train": 100, "test": 20} and r["data"]["official"] is False
    runs = r["train"]["experiments"]
    assert list(runs) == ["resnet20-fp-pgd_at", "en1resnet20-fp-pgd_at"]  # the gpu profile's first experiments
    for run in runs.values():
        assert run["epochs_done"] == 1 and run["val_pgd_acc"] is not None and run["train_images_per_s"] > 0
        assert run["peak_memory_gib"] > 0
    columns = r["columns"]["columns"]
    assert [c["column"] for c in columns.values()] == ["A1", "A2", "A3", "A4"]
    assert r["columns"]["amp"] == "fp32" and r["columns"]["images"] == 20 and "trained" in r["columns"]["model"]
    assert set(report["estimate"]["profiles"]) == {"gpu", "paper"} and report["estimate"]["dry"] is True
    md = (tmp_path / "report" / "gpu_check.md").read_text()
    for heading in ("Dry run on the CPU", "## Parts", "## CUDA-only tests", "## bench", "## Short training",
                    "## Paper columns A1-A4", "## Paper-grid estimate"):
        assert heading in md


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
    """One noisy and one plain ResNet20 epoch of 100 s on the full 45k images: the gpu profile's 31 runs."""
    parts = {"train": {"result": {"train_images": 45000, "experiments": {
        "resnet20-fp-pgd_at": {"epoch_wall_s": 100.0}, "en1resnet20-fp-pgd_at": {"epoch_wall_s": 100.0}}}},
        "columns": {"result": {"images": 10000, "total_s": 60.0}}}
    est = grid_estimate(parts, dry=False)
    gpu = est["profiles"]["gpu"]
    # sum over the 31 runs of members x depth factor x passes / 11 (PGD-10: pgd_at 11, tradeoff 12, natural 1):
    # 17 pgd_at member-units, 7 natural runs at 1/11, 16 tradeoff units (En1ResNet56 counts 3) at 12/11
    units = 17 + 7 / 11 + 16 * 12 / 11
    assert gpu["train_gpu_hours"] == pytest.approx(40 * 100 * units / 3600, abs=0.01)
    assert est["profiles"]["paper"]["train_gpu_hours"] == pytest.approx(5 * gpu["train_gpu_hours"], abs=0.05)
    # paper columns: 60 s per model and seed, 5 seeds, model factors summing to 40 (27 x 1, En2, En5, 2 x ResNet56)
    assert gpu["paper_columns_gpu_hours"] == pytest.approx(60 * 5 * 40 / 3600, abs=0.01)
    assert grid_estimate({}, dry=False) is None
    assert "Paper-grid estimate" in markdown({"parts": {}, "created": "now", "dry": False, "command": "c",
                                              "params": "p", "budget_s": 1, "wall_s": 1, "ok": False,
                                              "versions": {}, "estimate": est})
