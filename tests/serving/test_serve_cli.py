"""`vlmlab keys add` and `vlmlab serve ROOT --keys`: start, answer over HTTP, stop on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.slow


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_vlmlab_serve_answers_and_stops(ray_session, adapters, cache_dir, tmp_path):
    from ray import serve

    from vlmlab.serving._http import APP_NAME

    address = ray_session.get_runtime_context().gcs_address
    log = tmp_path / "serve.log"
    vlmlab = str(Path(sys.executable).with_name("vlmlab"))
    keys = tmp_path / "keys.yaml"
    added = subprocess.run(
        [vlmlab, "keys", "add", "ci", "--file", str(keys), "--budget", "5"],
        capture_output=True,
        text=True,
        check=True,
    )
    token = added.stdout.strip()
    assert token.startswith("vlm_") and token not in keys.read_text()
    command = [vlmlab, "serve", str(adapters), "--keys", str(keys), "--oracle-cpus", "0.5"]
    # This test's Ray already has a ledger without a journal (the session's other tests).
    command += ["--address", address, "--num-cpus", "0.5", "--ledger", "memory"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLMLAB_CACHE_DIR": cache_dir}
    with log.open("w") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        url = None
        while url is None and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            found = re.search(
                r"serving 3 adapter\(s\) and the conse oracle for 1 key\(s\) at (http://\S+)",
                log.read_text(),
            )
            url = found.group(1) if found else None
            time.sleep(0.5)
        assert url, log.read_text()
        assert "query ledger: in memory (--ledger memory)" in log.read_text()
        listed = requests.get(f"{url}/v1/adapters", timeout=30).json()["adapters"]
        assert len(listed) == 3
        usage = requests.get(
            f"{url}/v1/oracle/usage", headers={"Authorization": f"Bearer {token}"}, timeout=60
        )
        assert usage.status_code == 200 and usage.json()["queries_left"] == 5, usage.text

        def logged(line: str, times: int = 1) -> None:
            deadline = time.monotonic() + 60
            while log.read_text().count(line) < times:
                assert time.monotonic() < deadline and process.poll() is None, log.read_text()
                time.sleep(0.2)

        # Key operations without a restart: a new key is served once the file changes ...
        second = subprocess.run(
            [vlmlab, "keys", "add", "ci2", "--file", str(keys), "--budget", "3"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        logged("keys reloaded (the file changed): added ['ci2']")
        usage = requests.get(f"{url}/v1/oracle/usage", headers=_bearer(second), timeout=60)
        assert usage.status_code == 200 and usage.json()["queries_left"] == 3, usage.text
        # ... and a key removed from it stops working at the next request, on SIGHUP.
        tree = yaml.safe_load(keys.read_text())
        del tree["keys"]["ci"]
        stat = keys.stat()
        keys.write_text(yaml.safe_dump(tree))
        os.utime(keys, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # only the signal tells
        process.send_signal(signal.SIGHUP)
        logged("keys reloaded (SIGHUP): removed ['ci']")
        gone = requests.get(f"{url}/v1/oracle/usage", headers=_bearer(token), timeout=60)
        assert gone.status_code == 401, gone.text
        kept = requests.get(f"{url}/v1/oracle/usage", headers=_bearer(second), timeout=60)
        assert kept.status_code == 200
        # A broken file changes nothing, whatever is wrong with it: the served keys stay,
        # and the service goes on (bytes that are not UTF-8 once ended the process).
        good = keys.read_bytes()
        refused = "keys not reloaded (the file changed), the served keys stay"
        bad_files = [b"keys: [not, a, mapping]", b"keys:\n  ci2: {sha256: \xff\xfe}\n", b""]
        for count, bad in enumerate(bad_files, start=1):
            keys.write_bytes(bad)
            logged(refused, times=count)
            kept = requests.get(f"{url}/v1/oracle/usage", headers=_bearer(second), timeout=60)
            assert kept.status_code == 200, (bad, kept.text)
        text = log.read_text()
        assert "not UTF-8 text" in text and "holds no keys" in text, text
        keys.write_bytes(good)  # restored: the same keys, nothing changed
        logged("keys reloaded (the file changed): no change")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "stopped: removed the vlmlab-adapters app" in log.read_text()
    assert APP_NAME not in serve.status().applications


def test_vlmlab_serve_refuses_an_empty_root(tmp_path):
    from typer.testing import CliRunner

    from vlmlab.cli import app

    out = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert out.exit_code == 2 and "no artifacts" in out.output
    out = CliRunner().invoke(app, ["serve", str(tmp_path / "missing")])
    assert out.exit_code == 2 and "adapter root is not a folder" in out.output


def test_vlmlab_serve_refuses_bad_keys_files(tmp_path):
    from typer.testing import CliRunner

    from vlmlab.cli import app

    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  alice: {sha256: nothex, budget: -1}\n")
    out = CliRunner().invoke(app, ["serve", "--keys", str(keys)])
    assert out.exit_code == 2
    assert "keys.alice.sha256" in out.output and "keys.alice.budget" in out.output
    out = CliRunner().invoke(app, ["serve"])
    assert out.exit_code == 2 and "nothing to serve" in out.output
    listed = CliRunner().invoke(app, ["keys", "list", "--file", str(tmp_path / "none.yaml")])
    assert listed.exit_code == 2 and "no such keys file" in listed.output


def test_vlmlab_keys_add_takes_per_key_limits(tmp_path):
    from typer.testing import CliRunner

    from vlmlab.cli import app
    from vlmlab.serving import load_keys

    keys = str(tmp_path / "keys.yaml")
    added = CliRunner().invoke(
        app,
        [
            "keys",
            "add",
            "lab",
            "--file",
            keys,
            "--limit",
            "max_classes=100",
            "--limit",
            "max_tokens=16",
        ],
    )
    assert added.exit_code == 0, added.output
    assert (load_keys(keys)["lab"].max_classes, load_keys(keys)["lab"].max_tokens) == (100, 16)
    listed = CliRunner().invoke(app, ["keys", "list", "--file", keys])
    assert "max_classes 100" in listed.output and "max_tokens 16" in listed.output
    for bad in ("max_clases=3", "max_classes=lots", "max_classes"):
        refused = CliRunner().invoke(app, ["keys", "add", "x", "--file", keys, "--limit", bad])
        assert refused.exit_code == 2 and "NAME=INTEGER" in refused.output, bad
