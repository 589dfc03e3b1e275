"""Retries are bounded and on named errors only: the pool's replica calls and HttpOracle's."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import ray.exceptions

from vlmlab.pool import PoolOracle, replica_failure


class _Handle:
    """A deployment handle whose ``stats`` fails with ``errors`` in turn, then answers."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors
        self.calls = 0
        self.stats = self

    def remote(self) -> _Handle:
        return self

    def result(self) -> dict:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"pid": 1}


def _pool(handle: _Handle, retries: int) -> PoolOracle:
    pool = PoolOracle.__new__(PoolOracle)  # no Serve app: only the retry policy is under test
    pool.retries, pool._handle, pool.app_name = retries, handle, "test"
    return pool


def test_a_dead_replica_is_retried_within_the_bound():
    died = ray.exceptions.ActorDiedError()
    handle = _Handle([died, died])
    assert _pool(handle, retries=2).replica_stats() == {"pid": 1}
    assert handle.calls == 3
    handle = _Handle([died] * 3)
    with pytest.raises(ray.exceptions.ActorDiedError):
        _pool(handle, retries=2).replica_stats()
    assert handle.calls == 3  # retries + 1, then the error itself


@pytest.mark.parametrize(
    "error", [RuntimeError("a bug"), ray.exceptions.TaskCancelledError(), ValueError("yours")]
)
def test_other_errors_are_raised_at_once(error):
    handle = _Handle([error])
    with pytest.raises(type(error)):
        _pool(handle, retries=5).replica_stats()
    assert handle.calls == 1


def test_replica_failures_are_named():
    assert replica_failure(ray.exceptions.ActorUnavailableError("gone", b"\0" * 16))
    assert replica_failure(ray.exceptions.WorkerCrashedError())
    assert not replica_failure(ray.exceptions.GetTimeoutError())
    assert not replica_failure(KeyError("no such set"))


@pytest.fixture
def server():
    """A loopback server that answers the metadata call with the statuses queued in it."""
    answers: list[int] = []
    seen: list[int] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            status = answers.pop(0) if answers else 200
            seen.append(status)
            body = json.dumps(
                {"error": "slow down"}
                if status != 200
                else {
                    "backend": "test",
                    "model": "m",
                    "token_dim": 2,
                    "context_length": 8,
                    "embedding_mean": [0.0, 0.0],
                    "embedding_std": 1.0,
                }
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status != 200:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", answers, seen
    httpd.shutdown()


def test_http_oracle_retries_429_and_503_after_retry_after_then_gives_the_last_answer(server):
    from vlmlab.serving import HttpOracle

    url, answers, seen = server
    answers += [429, 503]
    assert HttpOracle(url, "k", retries=2).metadata.token_dim == 2
    assert seen == [429, 503, 200]
    answers += [429, 429, 429]
    seen.clear()
    with pytest.raises(ValueError, match="slow down"):  # the server's own words, not a retry's
        HttpOracle(url, "k", retries=2)
    assert seen == [429, 429, 429]
    answers += [400]
    seen.clear()
    with pytest.raises(ValueError):
        HttpOracle(url, "k", retries=5)
    assert seen == [400]  # a client mistake is final
