"""Results on an object store: real S3- and GCS-compatible servers on loopback, no mocks.

Each test runs on moto's S3 and on fake-gcs-server (GCS through Google's usual
credential chain). Runs, steps, artifacts and checkpoints go to ``s3://`` or
``gs://`` as they go to a folder; a resumed run reads its checkpoint back from
the URI alone; a writer killed mid-upload leaves nothing a reader sees; reports
are written beside the results; served adapters are found in the bucket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from vlmlab.cli import app
from vlmlab.results import ResultsStore, load_artifact, save_artifact
from vlmlab.runner import FileCheckpointer, run_experiment
from vlmlab.serving import AdapterStore
from vlmlab.specs import validate_spec
from vlmlab.storage import is_uri, locate, redact

TINY = {
    "name": "tiny",
    "backend": {"name": "conse"},
    "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 60, "forget": [0, 1]},
    "method": {"name": "bbf", "popsize": 6, "iterations": 6, "batch_size": 12},
    "budget": {"max_queries": 36},
    "seeds": [3],
    "eval_every": 2,
}


def _steps(store: ResultsStore) -> pd.DataFrame:
    steps = store.steps().drop(columns=["wall_seconds"])
    return steps.sort_values(["step", "split", "metric"]).reset_index(drop=True)


def test_uris_keep_their_query_and_hide_their_keys(s3_server):
    uri = s3_server.uri("bucket", "a/b")
    location = locate(uri)
    child = location / "runs" / "x.parquet"
    assert child.path == "bucket/a/b/runs/x.parquet"
    assert child.uri.split("?")[1] == uri.split("?")[1]  # the endpoint travels with it
    assert str(child) == "s3://bucket/a/b/runs/x.parquet"  # printed: no keys, no endpoint
    assert redact("s3://k:s@b/p") == "s3://***@b/p" and redact("/local/path") == "/local/path"
    assert is_uri(uri) and not is_uri("results/x") and not is_uri("file:///tmp/x")
    assert locate("file:///tmp/x").path == "/tmp/x"


def test_a_bad_uri_names_itself_without_its_keys():
    with pytest.raises(ValueError, match=r"cannot open results location 'nosuch://\*\*\*@b/p'"):
        locate("nosuch://key:secret@b/p")


def test_folders_are_the_prefixes_of_the_objects_below(object_store_results):
    """GCS lists no prefixes, only marker objects: folders are read off object names."""
    root = locate(object_store_results)
    for name in ("a/x.json", "b/c/y.json", ".hidden/z", "top.parquet"):
        (root / name).write_bytes(b"{}")
    assert [entry.name for entry in root.entries(folders=True)] == ["a", "b"]
    assert [entry.name for entry in (root / "b").entries(folders=True)] == ["c"]
    assert [entry.name for entry in root.entries(suffix=".parquet")] == ["top.parquet"]
    assert (root / "missing").entries(folders=True) == []


def test_store_artifact_and_checkpoint_on_an_object_store(object_store_results):
    scheme = object_store_results.split("://")[0]
    store = ResultsStore(object_store_results)
    row = {"run_id": "r1", "status": "running", "seed": 1, "test_H": 0.5}
    written = store.write_run(row)
    assert isinstance(written, str) and written.startswith(f"{scheme}://")
    store.write_run({**row, "status": "completed"})  # replaces, never duplicates
    runs = store.runs()
    assert runs.run_id.tolist() == ["r1"] and runs.status.tolist() == ["completed"]
    step = {"run_id": "r1", "step": 1, "split": "val", "metric": "H", "value": 0.25}
    store.write_steps("r1", 1, 1, [step])
    store.write_steps("r10", 1, 1, [{**step, "run_id": "r10"}])
    store.clear_run("r1")  # r1's steps go; r10's (same prefix) stay
    assert store.steps().run_id.tolist() == ["r10"]

    save_artifact(store.artifact_dir("r1"), {"contexts": torch.ones(1, 2, 3)}, {"kind": "toy"})
    artifact = load_artifact(store.artifact_dir("r1").uri)
    assert artifact.manifest["kind"] == "toy" and artifact.contexts.shape == (1, 2, 3)
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json"):
        load_artifact(store.artifact_dir("missing"))

    checkpointer = FileCheckpointer(store.checkpoint_path("r1"))
    assert checkpointer.load() is None
    checkpointer.save({"generation": 4}, {})
    assert FileCheckpointer(store.checkpoint_path("r1").uri).load() == {"generation": 4}


def test_run_and_resume_on_an_object_store_equal_a_local_run(conse, object_store_results, tmp_path):
    results = object_store_results  # s3:// or gs://
    scheme = results.split("://")[0]
    spec = validate_spec(TINY, "test")
    local = run_experiment(spec, tmp_path / "local", oracle=conse)[0]
    cut = run_experiment(spec, results, oracle=conse, stop_after=3)[0]
    assert cut.extra.get("interrupted")
    assert ResultsStore(results).runs().status.tolist() == ["running"]
    # A new process would know nothing but the URI: the checkpoint is read from it.
    resumed = run_experiment(spec, results, oracle=conse, resume=True)[0]
    assert resumed.resumed_from == 2 and resumed.test == local.test
    assert isinstance(resumed.artifact, str) and resumed.artifact.startswith(f"{scheme}://")
    store = ResultsStore(results)
    pd.testing.assert_frame_equal(_steps(store), _steps(ResultsStore(tmp_path / "local")))
    runs = store.runs()
    assert runs.status.tolist() == ["completed"] and runs.artifact[0] == resumed.artifact
    assert load_artifact(runs.artifact[0]).manifest["run_id"] == "tiny-bbf-s3"
    assert AdapterStore(locate(results) / "artifacts").ids() == ["tiny-bbf-s3"]  # served

    report = CliRunner().invoke(app, ["report", results])
    assert report.exit_code == 0, report.output
    assert "report/report.md" in report.output and "secret" not in report.output
    markdown = (locate(results) / "report" / "report.md").read_text()
    assert "H" in markdown
    figures = (locate(results) / "report").entries(suffix=".png")
    assert figures and all(f"report/{f.name}" in report.output for f in figures)


def test_a_writer_killed_mid_upload_leaves_nothing_visible(object_store, object_store_results):
    """SIGKILL after a 96 MB object's parts are on the server, before the upload completes.

    The writer goes through ``Location.write_bytes`` on a filesystem whose stream holds
    before closing, so the kill always lands in that window (racing a real upload was
    flaky: on a fast machine the upload could finish first).
    """
    results = object_store_results  # s3:// or gs://
    ResultsStore(results).write_run({"run_id": "kept", "status": "completed", "seed": 1})
    target = (locate(results) / "runs" / "big.parquet").uri
    writer = textwrap.dedent(
        f"""
        import time
        from vlmlab.storage import Location, locate

        real = locate({target!r})

        class HoldBeforeClose:
            def __init__(self, stream):
                self.stream = stream
            def __enter__(self):
                return self
            def write(self, data):
                written = self.stream.write(data)
                self.stream.flush()  # waits for the parts already sent
                print("parts sent", flush=True)
                time.sleep(600)  # the kill lands here, before close completes the upload
                return written
            def __exit__(self, *exc):
                self.stream.close()

        class Filesystem:
            def open_output_stream(self, path):
                return HoldBeforeClose(real.filesystem.open_output_stream(path))

        Location(Filesystem(), real.path, real.uri).write_bytes(bytes(96 * 2**20))
        print("written", flush=True)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "parts sent"
        if hasattr(object_store, "open_uploads"):  # S3 lists unfinished uploads; GCS cannot
            assert object_store.open_uploads(locate(results).path) >= 1
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not locate(target).exists()
    assert ResultsStore(results).runs().run_id.tolist() == ["kept"]
