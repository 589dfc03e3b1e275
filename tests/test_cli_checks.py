"""What a user learns before and after a run: validate, exit codes, units, folders, weights."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from vlmlab.cli import app
from vlmlab.errors import TrialsFailedError
from vlmlab.specs import SpecError, validate_spec

FAST = {
    "name": "fast",
    "backend": {"name": "latency:0"},
    "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 100, "forget": [0, 1, 2, 3]},
    "method": {"name": "bbf", "popsize": 4, "iterations": 3, "n_context": 2},
    "budget": {"max_queries": 12},
    "seeds": [1],
    "eval_every": 3,
}


def _write(tmp_path: Path, tree: dict, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def test_validate_finds_checkpoint_root_and_class_problems_without_ray(tmp_path):
    """Every problem at once, exit 2, in a process that never imports Ray."""
    spec = _write(
        tmp_path,
        {
            **FAST,
            "backend": {
                "name": "open_clip:vlmlab-tiny-fmnist",
                "pretrained": str(tmp_path / "missing.pt"),
            },
            "data": {**FAST["data"], "root": str(tmp_path / "no-data"), "forget": ["jeans"]},
        },
    )
    script = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from vlmlab.cli import app
        result = CliRunner().invoke(app, ["validate", {str(spec)!r}])
        print(result.output)
        print("exit", result.exit_code, "ray imported", "ray" in sys.modules)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    out = done.stdout
    assert "exit 2 ray imported False" in out, out
    assert "3 problems" in out
    assert "missing.pt" in out and "checkpoint file not found" in out
    assert "no-data" in out and "no such folder" in out
    assert "data.forget: 'jeans' is not a class" in out


def test_validate_and_dry_run_pass_a_sound_spec_and_show_the_plan(tmp_path):
    spec = _write(tmp_path, FAST)
    runner = CliRunner()
    for args in (["validate", str(spec)], ["run", str(spec), "--dry-run"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "3 generations x 4 queries = 12 queries (budget 12)" in result.output
        assert "results/fast" in result.output
    assert not (Path("results") / "fast").exists()  # a dry run writes nothing


def test_every_paper_config_validates_its_fields(tmp_path):
    """The shipped specs load; their data and weights may be absent here (notes or problems
    about those only)."""
    from vlmlab.specs import load_spec, preflight

    for path in sorted(Path("experiments").glob("*.yaml")):
        spec = load_spec(path)
        found = preflight(spec)
        unexpected = [
            p
            for p in found.problems
            if not p.startswith(("backend.pretrained", "data.root", "data.class_names"))
        ]
        assert unexpected == [], (path, unexpected)


def test_an_open_clip_backend_must_name_its_weights():
    tree = {**FAST, "backend": {"name": "open_clip:ViT-B-32"}}
    with pytest.raises(SpecError, match=r"backend.pretrained: .*random-init"):
        validate_spec(tree, "test")
    spec = validate_spec({**tree, "backend": {**tree["backend"], "pretrained": "random-init"}}, "t")
    assert "pretrained" not in spec.backend.oracle_kwargs()  # untrained, said on purpose
    from vlmlab.oracle import check_backend

    assert check_backend("open_clip:ViT-B-32", "random-init") == "ViT-B-32/random-init"
    result = CliRunner().invoke(app, ["zeroshot", "--backend", "open_clip:ViT-B-32"])
    assert result.exit_code == 2 and "--pretrained" in result.output


def test_exit_codes_usage_failure_and_interrupt(tmp_path, monkeypatch):
    runner = CliRunner()
    spec = _write(tmp_path, FAST)
    bad = runner.invoke(app, ["run", str(spec), "--set", "method.popsize=1"])
    assert bad.exit_code == 2 and "method.popsize: got 1" in bad.output
    results = str(tmp_path / "out")

    def failing(*args, **kwargs):
        raise TrialsFailedError([("fast-bbf-s1", "Traceback (most recent call last):\n  boom")])

    monkeypatch.setattr("vlmlab.runner.run_experiment", failing)
    failed = runner.invoke(app, ["run", str(spec), "--in-process", "--results", results])
    assert failed.exit_code == 1, failed.output
    assert "fast-bbf-s1" in failed.output and "boom" in failed.output

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vlmlab.runner.run_experiment", interrupted)
    stopped = runner.invoke(app, ["run", str(spec), "--in-process", "--results", results])
    assert stopped.exit_code == 130 and "--resume" in stopped.output

    def crashing(*args, **kwargs):
        raise ValueError("a bug, not a spec problem")

    monkeypatch.setattr("vlmlab.runner.run_experiment", crashing)
    crashed = runner.invoke(app, ["run", str(spec), "--in-process", "--results", results])
    assert crashed.exit_code == 1 and "a bug, not a spec problem" in crashed.output


def test_a_run_in_percent_with_the_drop_classes_reference(tmp_path, monkeypatch):
    """The drop-classes row equals a recomputation from the zero-shot logits, spends no
    query on any budget, and every figure a person reads is in percent."""
    monkeypatch.chdir(tmp_path)
    spec_path = _write(tmp_path, FAST)
    runner = CliRunner()
    ran = runner.invoke(app, ["run", str(spec_path), "--in-process"])
    assert ran.exit_code == 0, ran.output
    results = tmp_path / "results" / "fast"  # the default: results/<spec name>
    runs = pd.read_parquet(results / "runs")
    row = runs.iloc[0]
    assert row.queries_used == 12 and row.experiment == "fast" and len(row.fingerprint) == 12

    # Recompute: the zero-shot prompt's logits, forget classes removed from the candidates.
    from vlmlab.data import load_dataset, stratified_subset
    from vlmlab.methods.forgetting import forgetting_metrics
    from vlmlab.oracle import create_oracle

    oracle = create_oracle("latency:0")
    test = load_dataset("fashion-mnist", "test")
    test = test.subset(stratified_subset(test.labels, 100, seed=0))
    ref = oracle.register_images(test.image_set())
    prompt = oracle.phrase_embeddings("a photo of a")[None]
    logits = oracle.logits(prompt, test.class_names, ref)[0].clone()
    logits[:, [0, 1, 2, 3]] = -np.inf
    forget = np.isin(test.labels, [0, 1, 2, 3])
    expected = forgetting_metrics(logits.argmax(-1).numpy()[None], test.labels, forget)
    assert row.dropclasses_test_err_fgt == pytest.approx(1.0)
    assert row.dropclasses_test_H == pytest.approx(float(expected["H"][0]))
    assert row.dropclasses_test_acc_mem == pytest.approx(float(expected["acc_mem"][0]))
    assert row.dropclasses_test_devsafety >= 0  # dropping classes never costs a kept class
    assert "drop forget classes (0 queries)" in ran.output
    assert f"{row.dropclasses_test_H * 100:.2f}" in ran.output  # percent in the run's table

    report = runner.invoke(app, ["report", str(results), "--tolerance", "0.5"])
    assert report.exit_code == 0, report.output
    markdown = (results / "report" / "report.md").read_text()
    assert "| drop forget classes (0 queries) | 1 |" in markdown
    assert f"{row.dropclasses_test_H * 100:.2f}" in markdown
    assert f"{row.test_H * 100:.2f}" in markdown and "safe (≥ −0.5)" in markdown
    negative = runner.invoke(app, ["report", str(results), "--tolerance", "-3"])
    assert negative.exit_code == 2 and "--tolerance" in negative.output

    import pyarrow.parquet as pq

    schema = pq.read_schema(next((results / "runs").glob("*.parquet")))
    assert schema.field("test_H").metadata[b"unit"] == b"fraction"
    assert schema.field("queries_used").metadata[b"unit"] == b"queries"
    assert schema.field("wall_seconds").metadata[b"unit"] == b"seconds"


def test_a_folder_with_two_experiments_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    other = {**FAST, "name": "other", "data": {**FAST["data"], "forget": [5, 7, 9]}}
    for tree in (FAST, other):
        spec = _write(tmp_path, tree, f"{tree['name']}.yaml")
        ran = runner.invoke(app, ["run", str(spec), "--in-process", "--results", "shared"])
        assert ran.exit_code == 0, ran.output
    report = runner.invoke(app, ["report", "shared"])
    assert report.exit_code == 0, report.output
    assert "holds 2 experiments: fast (1 runs), other (1 runs)" in report.output
    assert report.output.count("Black-Box Forgetting — ") == 2


def test_validate_reads_an_image_folder_without_decoding(tmp_path):
    """Class names come from folder names: forget classes are checked against them."""
    from PIL import Image

    for name in ("001.cat", "002.dog", "003.fox"):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.jpg")
    tree = {**FAST, "data": {"dataset": "imagefolder", "root": str(tmp_path / "photos")}}
    good = _write(tmp_path, {**tree, "data": {**tree["data"], "forget": ["cat"]}}, "good.yaml")
    result = CliRunner().invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "split here" in result.output and "disjoint" in result.output
    bad = _write(tmp_path, {**tree, "data": {**tree["data"], "forget": ["wolf"]}}, "bad.yaml")
    refused = CliRunner().invoke(app, ["validate", str(bad)])
    assert refused.exit_code == 2 and "'wolf' is not a class" in refused.output
    assert "cat, dog, fox" in refused.output
