"""The command line (issue 17, item 10): anticipated failures are one line and exit 2; others keep the traceback."""
from __future__ import annotations

import errno

import pytest

from paper_repro import cli, verify


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "reports/verification.json"),
     "error: disk full writing reports/verification.json: free space and rerun `verify`"),
    (__import__("paper_repro.metrics_schema", fromlist=["MetricsError"]).MetricsError(
        "metrics/r.json: metrics: accuracy is missing"), "error: metrics/r.json: metrics: accuracy is missing"),
    (__import__("paper_repro.checkpoint", fromlist=["CheckpointError"]).CheckpointError(
        "runs/r/state/model.safetensors: unreadable"), "error: runs/r/state/model.safetensors: unreadable"),
])
def test_anticipated_failures_are_one_line_with_exit_2(monkeypatch, capsys, error, expected):
    def fail(args):
        raise error
    monkeypatch.setattr(verify, "main", fail)
    assert cli.main(["verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and len(err.splitlines()) == 1


def test_an_unexpected_failure_keeps_its_traceback(monkeypatch):
    def fail(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(verify, "main", fail)
    with pytest.raises(ZeroDivisionError):
        cli.main(["verify"])
    monkeypatch.setattr(verify, "main", lambda args: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(PermissionError):
        cli.main(["verify"])
