"""The `report` stage (issue 17, item 8): notebooks run in a staging folder and their outputs replace the previous report
only when every notebook succeeded; a failure is one line and leaves the previous report as it was."""
from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from paper_repro import report

WRITE = "from pathlib import Path\n(Path(out_dir) / 'tables').mkdir(parents=True, exist_ok=True)\n" \
        "(Path(out_dir) / 'tables' / '{name}.csv').write_text('fresh')\n"


def notebook(path, body, fail=False):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(f"out_dir = 'reports'\nfail = {fail}")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def setup(tmp_path):
    sources = tmp_path / "notebooks"
    sources.mkdir()
    notebook(sources / "a.ipynb", WRITE.format(name="a"))
    notebook(sources / "b.ipynb", WRITE.format(name="b") + "if fail:\n    raise ValueError('broken input')\n")
    out = tmp_path / "reports"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "old.csv").write_text("previous run")
    (out / "verification.json").write_text("{}")
    return sources, out


@pytest.mark.slow
def test_a_failing_notebook_leaves_the_previous_report(setup):
    sources, out = setup
    with pytest.raises(report.ReportError) as err:
        report.render(sources, out, {"out_dir": str(out)}, {"b": {"fail": True}}, quiet=True)
    message = str(err.value)
    assert "notebook b.ipynb failed in cell" in message and "ValueError: broken input" in message
    assert "\n" not in message and f"{out} is unchanged" in message
    assert sorted(p.name for p in (out / "tables").iterdir()) == ["old.csv"]  # a.csv was staged, never promoted
    assert not (out / "notebooks").exists()
    assert (out / report.STAGING / "notebooks" / "b.ipynb").is_file()  # the failed notebook, to read


@pytest.mark.slow
def test_a_successful_report_replaces_the_previous_one(setup):
    sources, out = setup
    written = report.render(sources, out, {"out_dir": str(out)}, {}, quiet=True)
    assert sorted(p.name for p in (out / "tables").iterdir()) == ["a.csv", "b.csv"]  # old.csv was stale
    assert (out / "tables" / "a.csv").read_text() == "fresh" and (out / "verification.json").is_file()
    assert {p.name for p in (out / "notebooks").iterdir()} == {"a.ipynb", "a.html", "b.ipynb", "b.html"}
    assert not (out / report.STAGING).exists() and set(written) >= {out / "tables" / "a.csv"}
    report.render(sources, out, {"out_dir": str(out)}, {}, only=["a"], quiet=True)  # --only keeps b's outputs
    assert (out / "tables" / "b.csv").is_file()


def test_report_without_metrics_is_a_one_line_error(tmp_path):
    (tmp_path / "params.yaml").write_text("experiments:\n  r:\n    model: resnet8\n")
    proc = subprocess.run([sys.executable, "-m", "paper_repro", "report", "--metrics", str(tmp_path / "metrics")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "no metrics to report on" in proc.stderr and "Traceback" not in proc.stderr
