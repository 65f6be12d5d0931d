"""Source notebooks are clean (no outputs, kernel python3, a `parameters` cell), and each one runs
under papermill (-k python3) on a tiny synthetic pipeline tree, writing its figures (PNG + PDF)
and tables (CSV + Markdown + LaTeX); they also run when no run exists at all."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import papermill
import pytest

from fixtures_metrics import write_tree
from paper_repro import verify

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
COMMON_PARAMETERS = ("metrics_dir", "runs_dir", "data_meta", "out_dir", "profile")
NOT_COMPARABLE = "NOT COMPARABLE WITH THE PAPER"
EXPECTED = {
    "01_data_provenance": (["01_experiment_grid"], ["01_data_provenance", "01_runs", "01_sanity"]),
    "02_enresnet_robustness": (["02_enresnet_robustness"], ["02_enresnet_robustness", "02_enresnet_robustness_long"]),
    "03_quantized_benchmark": (["03_quantized_paper_attacks", "03_quantized_audit_attacks", "03_br_vs_bc"],
                               ["03_quantized_benchmark", "03_quantized_benchmark_audit"]),
    "04_sparsity": (["04_sparsity_natural_vs_adversarial", "04_weight_histograms", "04_channel_sparsity_heatmap"],
                    ["04_sparsity_summary", "04_sparsity_layers", "04_small_weight_share"]),
    "05_tradeoff": (["05_tradeoff"], ["05_tradeoff"]),
    "06_efficiency": (["06_compression", "06_accuracy_vs_size"], ["06_efficiency"]),
    "07_summary": (["07_verdicts"], ["07_verification_claims", "07_verification_numbers"]),
}


def notebook_problems(nb: nbformat.NotebookNode) -> list[str]:
    """Why a source notebook is not clean (empty list: clean)."""
    problems = []
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append(f"kernel name {nb.metadata.get('kernelspec', {}).get('name')!r}, not 'python3'")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.get("outputs"):
            problems.append(f"cell {i} has outputs")
        if cell.cell_type == "code" and cell.get("execution_count") is not None:
            problems.append(f"cell {i} has an execution count")
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{len(tagged)} cells tagged 'parameters' (want 1)")
    if "papermill" in nb.metadata:
        problems.append("papermill metadata: this is an executed notebook")
    return problems


def test_the_notebook_set():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_source_notebook_is_clean(name):
    path = NOTEBOOK_DIR / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert notebook_problems(nb) == []
    params = papermill.inspect_notebook(str(path))
    assert set(COMMON_PARAMETERS) <= set(params), sorted(set(COMMON_PARAMETERS) - set(params))


def test_clean_check_catches_dirty_notebooks():
    nb = nbformat.read(NOTEBOOK_DIR / "01_data_provenance.ipynb", as_version=4)
    nb.metadata["kernelspec"]["name"] = "python3.11-venv"
    nb.cells[2].outputs = [nbformat.v4.new_output("stream", text="hi")]
    nb.cells[2].execution_count = 3
    problems = notebook_problems(nb)
    assert len(problems) == 3 and "kernel name" in problems[0]


def execute_all(root: Path, metrics: str, data_meta: str, verification: str) -> dict[str, subprocess.CompletedProcess]:
    """papermill every notebook into root/reports, two at a time."""
    (root / "reports").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MPLBACKEND="Agg")

    def one(name: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "papermill", "-k", "python3", "--no-progress-bar", "--log-level", "ERROR",
               str(NOTEBOOK_DIR / f"{name}.ipynb"), f"reports/{name}.ipynb",
               "-p", "metrics_dir", metrics, "-p", "runs_dir", "runs", "-p", "data_meta", data_meta,
               "-p", "out_dir", "reports", "-p", "profile", "smoke"]
        if name in ("02_enresnet_robustness", "04_sparsity", "07_summary"):
            cmd += ["-p", "verification_json", verification]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        return dict(zip(EXPECTED, pool.map(one, EXPECTED)))


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pipeline")
    paths = write_tree(root)
    verify.run(paths["metrics"], paths["reports"], quiet=True)
    return root, execute_all(root, "metrics", "data/prepared/meta.json", "reports/verification.json")


def _outputs_text(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    return "\n".join(str(o.get("data", {}).get("text/markdown", "")) + str(o.get("text", ""))
                     for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes_and_writes_outputs(executed, name):
    root, results = executed
    result = results[name]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures, tables = EXPECTED[name]
    for fig in figures:
        for ext in ("png", "pdf"):
            assert (root / "reports" / "figures" / f"{fig}.{ext}").stat().st_size > 1000, (fig, ext)
    for table in tables:
        csv = (root / "reports" / "tables" / f"{table}.csv").read_text()
        assert csv.startswith("# profile: smoke") and NOT_COMPARABLE in csv.splitlines()[0]
        assert NOT_COMPARABLE in (root / "reports" / "tables" / f"{table}.md").read_text()
        assert r"\begin{tabular}" in (root / "reports" / "tables" / f"{table}.tex").read_text()
    text = _outputs_text(root / "reports" / f"{name}.ipynb")
    assert NOT_COMPARABLE in text


@pytest.mark.slow
def test_missing_runs_show_not_run(executed):
    root, _ = executed
    assert "en5resnet20: not run in this profile" in _outputs_text(root / "reports" / "02_enresnet_robustness.ipynb")
    wide = (root / "reports" / "tables" / "02_enresnet_robustness.md").read_text()
    assert "| en5resnet20 | 82.52 | not run in this profile |" in wide


@pytest.mark.slow
def test_html_export(executed):
    from nbconvert import HTMLExporter

    root, _ = executed
    html, _ = HTMLExporter().from_filename(str(root / "reports" / "04_sparsity.ipynb"))
    assert "<img" in html and NOT_COMPARABLE in html


@pytest.mark.slow
def test_notebooks_run_with_no_runs_at_all(tmp_path):
    results = execute_all(tmp_path, "metrics", "data/prepared/meta.json", "reports/verification.json")
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
        assert "not run in this profile" in _outputs_text(tmp_path / "reports" / f"{name}.ipynb"), name


# ------------------------------------------------------------------------------------------------
# The helpers the notebooks are built on (fast)
# ------------------------------------------------------------------------------------------------

def test_banner_says_when_not_comparable():
    from fixtures_metrics import simple_metrics
    from paper_repro import notebook as N

    paper = [simple_metrics("a", acc={"natural": 70.0})]
    assert N.NOT_COMPARABLE not in N.banner(paper, {"official": True}, "paper")
    assert N.NOT_COMPARABLE in N.banner(paper, {"official": True}, "cpu")
    assert N.NOT_COMPARABLE in N.banner(paper, {"official": False}, "paper")
    assert N.NOT_COMPARABLE in N.banner([simple_metrics("a", profile="smoke")], None, "paper")
    assert N.NOT_COMPARABLE in N.banner([], None, "paper")
    assert "profile: cpu" in N.banner(paper, None, "cpu")


def test_save_table_writes_csv_markdown_latex(tmp_path):
    import pandas as pd

    from paper_repro import tables as R

    df = pd.DataFrame({"run": ["en1resnet20-4bit-br-pgd_at"], "A4 C&W": ["65.69 ± 0.26"], "share %": [8.657]})
    paths = R.save_table(df, tmp_path, "t", "profile: smoke | NOT COMPARABLE WITH THE PAPER")
    assert [p.name for p in paths] == ["t.csv", "t.md", "t.tex"]
    back = pd.read_csv(paths[0], comment="#")
    assert back.loc[0, "share %"] == 8.66
    assert "| en1resnet20-4bit-br-pgd_at | 65.69 ± 0.26 | 8.66 |" in paths[1].read_text()
    tex = paths[2].read_text()
    assert r"pgd\_at" in tex and r"C\&W" in tex and r"share \%" in tex and r"$\pm$" in tex


def test_as_list_and_variant():
    from paper_repro import notebook as N

    assert N.as_list("a, b,,c") == ["a", "b", "c"] and N.as_list(["x"]) == ["x"] and N.as_list(None) == []
    assert N.variant("none", "none") == "fp32" and N.variant("ternary", "br") == "ternary BR"
    assert N.variant_order(["4bit BR", "ternary BC", "fp32", "ternary BR"]) == ["fp32", "ternary BR", "ternary BC",
                                                                               "4bit BR"]
