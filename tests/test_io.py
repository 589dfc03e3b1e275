"""Result files honour the umask: collaborators on a shared filesystem can read them."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from vlmlab._io import atomic_write_bytes, current_umask, default_file_mode
from vlmlab.results import ResultsStore, save_artifact
from vlmlab.runner import FileCheckpointer
from vlmlab.serving import add_key
from vlmlab.tasks import runs_schema_of_tasks


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_results(folder: Path) -> ResultsStore:
    """A results folder as a trial leaves it: runs and steps rows, a checkpoint, an artifact."""
    store = ResultsStore(folder, runs_schema_of_tasks())
    store.write_run({"run_id": "r", "status": "completed", "finished_at": datetime.now(UTC)})
    store.write_steps("r", 1, 2, [{"run_id": "r", "step": 1, "split": "val", "metric": "H"}])
    FileCheckpointer(store.checkpoint_path("r")).save({"version": 1}, {})
    save_artifact(
        store.artifact_dir("r").native,
        {"contexts": torch.zeros(1, 2, 4)},
        {"kind": "toy", "class_names": ["x"]},
    )
    return store


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)]
)
def test_results_files_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    with umask(mask):
        assert current_umask() == mask and default_file_mode() == file_mode
        _write_results(tmp_path / "results")
    files = [p for p in (tmp_path / "results").rglob("*") if p.is_file()]
    folders = [p for p in (tmp_path / "results").rglob("*") if p.is_dir()]
    names = {p.relative_to(tmp_path / "results").as_posix() for p in files}
    assert {"runs/r.parquet", "checkpoints/r.pkl", "artifacts/r/manifest.json"} <= names
    assert any(name.startswith("steps/") for name in names)
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(file_mode) for p in files}
    assert {p.name: oct(_mode(p)) for p in folders} == {p.name: oct(dir_mode) for p in folders}


def test_a_replaced_file_takes_the_umask_of_its_writer(tmp_path):
    target = tmp_path / "report.md"
    with umask(0o077):
        atomic_write_bytes(target, b"private draft")
    assert _mode(target) == 0o600
    with umask(0o022):
        atomic_write_bytes(target, b"for everyone")
    assert _mode(target) == 0o644 and target.read_bytes() == b"for everyone"
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_explicit_mode_wins_over_the_umask(tmp_path):
    with umask(0o022):
        atomic_write_bytes(tmp_path / "secret", b"x", mode=0o600)
    assert _mode(tmp_path / "secret") == 0o600


def test_the_keys_file_stays_private_whatever_the_umask(tmp_path):
    keys = tmp_path / "keys.yaml"
    with umask(0o022):
        add_key(keys, "alice")
        add_key(keys, "bob")  # rewritten: still the owner's alone
    assert _mode(keys) == 0o600
