"""The committed bundle results/cpu/ is what its commands make (issue 13), in the spirit of RobustBench's
clean-accuracy test: re-verifying the committed metrics gives the committed verdicts; the README's
results block is generated from them; every published model loads through the zoo and, on the
stand-in test images, scores the natural accuracy of its model card; the rebuild from the bundle
gives the published tables. Nothing here trains."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paper_repro import publish, verify, zoo

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "results" / "cpu"
SHARED_DATA = ROOT.parent / "shared" / "data"
MAX_BUNDLE_BYTES = 20_000_000


@pytest.fixture(scope="module")
def manifest() -> dict:
    assert (BUNDLE / "bundle.json").is_file(), "results/cpu/ is not published: run `make cpu` and commit it"
    return json.loads((BUNDLE / "bundle.json").read_text())


def test_bundle_files_are_the_manifest_and_small(manifest):
    files = {str(f.relative_to(BUNDLE)) for f in BUNDLE.rglob("*") if f.is_file()} - {"bundle.json"}
    assert files == set(manifest["files"]) - {"bundle.json"}
    for rel, entry in manifest["files"].items():
        if rel != "bundle.json":
            assert publish._md5(BUNDLE / rel) == entry["md5"], f"{rel} changed since it was published"
    assert manifest["bytes"] < MAX_BUNDLE_BYTES
    assert publish.machine_paths(BUNDLE) == []
    assert all(c != "unknown" and not c.endswith("+dirty") for c in manifest["code_commits"]), manifest["code_commits"]
    judged = manifest.get("reverify_commit", "")
    assert judged != "unknown" and not judged.endswith("+dirty"), judged  # judged again by committed code only
    assert {"verification.md", "verification.json", "summary.csv", "data.json"} <= files
    assert any(f.startswith("figures/") and f.endswith(".png") for f in files)
    assert len([f for f in files if f.startswith("notebooks/")]) == len(list((ROOT / "notebooks").glob("*.ipynb")))


def test_reverifying_the_committed_metrics_gives_the_committed_verdicts(tmp_path, manifest):
    report = verify.run(BUNDLE / "metrics", tmp_path, quiet=True)
    committed = json.loads((BUNDLE / "verification.json").read_text())
    for key in ("counts", "qualitative", "numeric", "provenance", "rules"):
        assert json.loads(json.dumps(report[key])) == committed[key], key
    assert {r["id"] for r in committed["qualitative"]} == {f"C{i}" for i in range(1, 8)}
    assert all(r["verdict"] != "not run" for r in committed["qualitative"]), "every claim gets a verdict"


def test_readme_block_is_generated_from_the_bundle(manifest):
    readme = (ROOT / "README.md").read_text()
    verification = json.loads((BUNDLE / "verification.json").read_text())
    block = publish.readme_block(verification, manifest, "results/cpu")
    assert block in readme, "README results block differs: run `python -m paper_repro publish --readme README.md`"
    assert readme.index(publish.README_START) < readme.index("## ")  # on the first screen


def test_every_published_model_loads_with_its_card(manifest):
    for name in manifest["runs"]:
        card = zoo.card(name, "cpu")
        model = zoo.load(name, "cpu")
        assert card["name"] == name and card["clean_acc"] is not None
        assert card["size"]["packed_bytes"] == (BUNDLE / "models" / f"{name}.safetensors").stat().st_size
        with torch.no_grad():
            assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(zoo.ZooError, match="available"):
        zoo.load("no-such-model", "cpu")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "make_cifar10_standin.py").is_file(), reason="needs ../shared/data")
def test_published_models_score_their_card_on_the_standin(tmp_path, manifest):
    """Natural accuracy recomputed through the zoo on the same stand-in images, noise seeded as in evaluation."""
    from paper_repro.data import prepare, load_prepared

    archive = ROOT / "data" / "standin" / "cifar-10-python.tar.gz"
    if not archive.is_file():
        archive = tmp_path / "cifar-10-python.tar.gz"
        subprocess.run([sys.executable, str(SHARED_DATA / "make_cifar10_standin.py"), str(archive)], check=True,
                       capture_output=True)
    data_md5 = json.loads((BUNDLE / "data.json").read_text())["archive_md5"]
    prepare(str(archive), tmp_path / "prepared", md5=None, expect_counts=None)
    data = load_prepared(tmp_path / "prepared")
    assert data.meta["archive_md5"] == data_md5, "not the stand-in the bundle was made from"
    for name in manifest["runs"]:
        card = zoo.card(name, "cpu")
        natural = card["paper_columns"]["A1"]
        n = natural["n"]
        model = zoo.load(name, "cpu").to(memory_format=torch.channels_last)  # the evaluation's layout
        if hasattr(model, "seed_noise"):
            model.seed_noise(natural["seeds"][0])
        x = torch.as_tensor(data.x_test[:n]).float().div(255).contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(data.y_test[:n]).long()
        batch = json.loads((BUNDLE / "metrics" / f"{name}.json").read_text())["settings"]["batch_size"]
        with torch.no_grad():  # the evaluation's batches: the noise std is taken over each batch
            correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, n, batch))
        assert abs(100.0 * correct / n - natural["accuracy"]) <= 0.5, (name, 100.0 * correct / n, natural)


@pytest.mark.slow
def test_rebuild_from_the_bundle_gives_the_published_tables(tmp_path, manifest):
    """`report --bundle results/cpu` on a fresh clone: no training, no dataset, the same tables."""
    env = {**os.environ, "CI": "1"}
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "report", "--bundle", str(BUNDLE),
                           "--out", str(tmp_path / "rebuilt")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    published = sorted((BUNDLE / "tables").glob("*.csv"))
    assert published
    for table in published:
        assert (tmp_path / "rebuilt" / "tables" / table.name).read_text() == table.read_text(), table.name
    assert len(list((tmp_path / "rebuilt" / "notebooks").glob("*.ipynb"))) == len(list((BUNDLE / "notebooks").glob("*")))
    shutil.rmtree(tmp_path / "rebuilt")


@pytest.mark.parametrize("folder", sorted((ROOT / "results" / "gpu-check").glob("*/")), ids=lambda p: p.name)
def test_gpu_results_match_their_manifest_and_name_no_machine_folders(folder):
    """Each published GPU run lists every file with its md5, and its reports name no machine's folders."""
    listed = dict(reversed(line.split()) for line in (folder / "README.md").read_text().splitlines()
                  if re.fullmatch(r"    [0-9a-f]{32}  \S+", line))
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "README.md"}
    assert set(listed) == present
    for name, md5 in listed.items():
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() == md5, name
    assert publish.machine_paths(folder) == []
    report = json.loads((folder / "gpu_check.json").read_text())
    assert report["dry"] is False and report["device"]
    if "cuda_tests" in report["parts"]:  # a report of some parts only (--parts) may not have run them
        assert report["parts"]["cuda_tests"]["result"]["failed"] == []


@pytest.mark.slow
def test_reverify_judges_the_bundle_again_from_itself_and_changes_only_what_it_judges(tmp_path, manifest):
    """`publish --reverify` on a copy: no runs, no data; metrics, models and cards untouched, the verdicts those
    of the current code (the committed ones), every file in the new manifest, the judging commit recorded."""
    shutil.copytree(BUNDLE, tmp_path / "results" / "cpu")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")  # relative paths only: the notebooks record them
    env = {**os.environ, "CI": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "publish", "--reverify", "results/cpu",
                           "--notebooks", "notebooks"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = tmp_path / "results" / "cpu"
    new = json.loads((again / "bundle.json").read_text())
    assert new["reverify_commit"] and new["code_commits"] == manifest["code_commits"]
    for rel, entry in manifest["files"].items():
        if rel.startswith(("metrics/", "models/")) or rel in ("data.json", "report_params.json"):
            assert new["files"][rel] == entry, f"{rel} changed: reverify must only judge"
    for rel, entry in new["files"].items():
        assert publish._md5(again / rel) == entry["md5"], rel
    committed = json.loads((BUNDLE / "verification.json").read_text())
    assert json.loads((again / "verification.json").read_text())["qualitative"] == committed["qualitative"]
    for table in sorted((BUNDLE / "tables").glob("*.csv")):
        assert (again / "tables" / table.name).read_text() == table.read_text(), table.name
    assert publish.machine_paths(again) == []


def test_a_failed_reverify_leaves_the_bundle_as_it_was(tmp_path, monkeypatch):
    bundle = tmp_path / "cpu"
    shutil.copytree(BUNDLE, bundle)
    before = {str(p.relative_to(bundle)): publish._md5(p) for p in bundle.rglob("*") if p.is_file()}
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_broken.ipynb").write_text("{not a notebook")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    with pytest.raises(publish.PublishError, match="`report` failed"):  # after verify rewrote the verification
        publish.reverify(bundle, tmp_path / "work", tmp_path / "notebooks")
    assert {str(p.relative_to(bundle)): publish._md5(p) for p in bundle.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "cpu.old").exists()
    shutil.copytree(bundle, tmp_path / "cpu.old")  # as a killed reverify leaves it: the only good copy
    with pytest.raises(publish.PublishError, match="a reverify was interrupted"):
        publish.reverify(bundle, tmp_path / "work", tmp_path / "notebooks")
    assert (tmp_path / "cpu.old" / "bundle.json").is_file()
