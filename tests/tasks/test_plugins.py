"""Plugins by entry point: a distribution installed beside vlmlab brings a task (with its own
method and metric), a backend and a dataset, and vlmlab's commands use them with no vlmlab
file changed and no registration call of ours."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from vlmlab.plugins import GROUPS, load_plugins

HERE = Path(__file__).parent
ENTRY_POINTS = """\
[vlmlab.tasks]
toy = toy_plugin:register_toy_task

[vlmlab.backends]
toy-latency = toy_plugin:register_toy_backend

[vlmlab.datasets]
toy-shapes = toy_plugin:register_toy_dataset
"""


def _install(site: Path, entry_points: str = ENTRY_POINTS) -> Path:
    """A distribution as pip leaves it: its dist-info (metadata, entry points) on a path."""
    info = site / "vlmlab_toy_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlmlab-toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return site


def _vlmlab(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(HERE)]),
        "HF_HUB_OFFLINE": "1",
    }
    vlmlab = str(Path(sys.executable).with_name("vlmlab"))
    return subprocess.run([vlmlab, *args], env=env, capture_output=True, text=True, timeout=600)


def test_an_installed_plugin_runs_and_reports_through_the_commands(tmp_path):
    site = _install(tmp_path / "site")
    listed = _vlmlab(site, "tasks")
    assert listed.returncode == 0, listed.stderr
    assert "toy" in listed.stdout and "Toy task" in listed.stdout
    spec = HERE / "toy.yaml"  # the plugin's one spec, as a user writes it
    results = tmp_path / "results"
    run = _vlmlab(site, "run", str(spec), "--in-process", "--results", str(results))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "toy score on the test split" in run.stdout
    (row,) = pq.read_table(next((results / "runs").glob("*.parquet"))).to_pylist()
    assert row["task"] == "toy" and row["dataset"] == "toy-shapes" and row["status"] == "completed"
    assert row["queries_used"] == 8 and 0 <= row["test_toy_score"] <= 1
    report = _vlmlab(site, "report", str(results))
    assert report.returncode == 0, report.stderr
    assert "Toy task" in report.stdout and "toy-shapes" in report.stdout


def test_a_method_setting_is_declared_once_and_reaches_the_method(tmp_path):
    """The toy's own setting (``spread``), declared once in its config: the spec is validated
    by it (a bad value is refused naming the field) and the method reads it as it is."""
    site = _install(tmp_path / "site")
    tree = yaml.safe_load((HERE / "toy.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tree, "method": {**tree["method"], "spread": -1}}))
    refused = _vlmlab(site, "validate", str(bad))
    assert refused.returncode != 0
    assert "method.spread" in refused.stdout + refused.stderr
    scores = {}
    for spread in (0.01, 1.0):
        spec = tmp_path / f"spread-{spread}.yaml"
        spec.write_text(yaml.safe_dump({**tree, "method": {**tree["method"], "spread": spread}}))
        results = tmp_path / f"results-{spread}"
        run = _vlmlab(site, "run", str(spec), "--in-process", "--results", str(results))
        assert run.returncode == 0, run.stdout + run.stderr
        steps = pq.read_table(next((results / "steps").glob("*.parquet"))).to_pylist()
        scores[spread] = sorted(
            (r["step"], r["value"]) for r in steps if r["metric"] == "best_score"
        )
    assert scores[0.01] != scores[1.0]  # the setting changed what the method searched


def test_a_broken_plugin_is_skipped_with_a_warning_naming_it(tmp_path, monkeypatch):
    site = _install(tmp_path / "site", "[vlmlab.datasets]\nbroken = no_such_module:register\n")
    monkeypatch.syspath_prepend(str(site))
    import importlib

    importlib.invalidate_caches()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_plugins("vlmlab.datasets") == []
    assert any("'broken'" in str(w.message) and "no_such_module" in str(w.message) for w in caught)
    from vlmlab.data import list_datasets

    assert "fashion-mnist" in list_datasets()  # vlmlab goes on
    with pytest.raises(ValueError, match="unknown plugin group"):
        load_plugins("vlmlab.nothing")
    assert set(GROUPS) == {"vlmlab.tasks", "vlmlab.backends", "vlmlab.datasets"}


def test_registering_checks_names_and_refuses_to_replace_silently():
    from vlmlab.data import register_dataset
    from vlmlab.oracle import create_oracle, register_backend

    with pytest.raises(ValueError, match="registered already"):
        register_backend("conse", lambda model, **kw: create_oracle("latency:0"), "no")
    with pytest.raises(ValueError, match="letters, digits"):
        register_backend("a:b", lambda model, **kw: create_oracle("latency:0"), "no")
    with pytest.raises(ValueError, match="registered already"):
        register_dataset("fashion-mnist", lambda split, **kw: None, "no")  # type: ignore[arg-type,return-value]
