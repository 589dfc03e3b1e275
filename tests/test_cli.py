from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vlmlab.cli import app


def test_lists():
    runner = CliRunner()
    backends = runner.invoke(app, ["backends"])
    assert backends.exit_code == 0 and "conse" in backends.output and "not CLIP" in backends.output
    datasets = runner.invoke(app, ["datasets"])
    assert datasets.exit_code == 0 and "fashion-mnist" in datasets.output


@pytest.mark.slow
def test_zeroshot_names_backend_and_dataset(cache_dir, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE_DIR", cache_dir)
    result = CliRunner().invoke(app, ["zeroshot", "--n", "40"])
    assert result.exit_code == 0, result.output
    assert "backend=ConSE" in result.output and "dataset=fashion-mnist" in result.output
    assert "accuracy=" in result.output and "CLIP" not in result.output.replace("\n", " ")


def test_errors_are_never_wrapped_at_the_terminal_width(tmp_path, monkeypatch):
    """CI once failed because a long path broke a message over two lines; grep must find it."""
    monkeypatch.setenv("COLUMNS", "30")
    missing = tmp_path / ("deep-" * 12) / "results [v2]"
    result = CliRunner().invoke(app, ["report", str(missing)])
    assert result.exit_code == 2
    assert f"no results in {str(missing)!r}" in result.output
    assert result.output.count("\n") == 1
