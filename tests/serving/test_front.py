"""The front door's bounds in Serve's proxy, as plain ASGI (no Ray): slices, counts, refusals.

Over real HTTP, with the proxy's memory measured: ``test_hardening.py``.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from vlmlab.front import (
    SLICE_BYTES,
    HeaderCappedProtocol,
    UnreadResponseGuard,
    proxy_middlewares,
)

BODY = b"x" * (3 * SLICE_BYTES + 5)


def _app(body: bytes):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def _scope(token: bytes = b"Bearer one") -> dict:
    return {"type": "http", "headers": [(b"authorization", token)], "client": ("127.0.0.1", 1)}


def test_a_big_body_is_written_in_slices_and_counted_until_taken():
    guard = UnreadResponseGuard(_app(BODY), max_unread_bytes=10**9, unread_timeout_s=5)
    seen: list[tuple[int, bool, int]] = []

    async def send(message):
        if message["type"] == "http.response.body":
            waiting = sum(guard.unread.values())
            seen.append((len(message["body"]), message["more_body"], waiting))

    asyncio.run(guard(_scope(), None, send))
    assert [size for size, _, _ in seen] == [SLICE_BYTES] * 3 + [5]
    assert [more for _, more, _ in seen] == [True, True, True, False]
    assert [waiting for _, _, waiting in seen] == [len(BODY) - n * SLICE_BYTES for n in range(4)]
    assert guard.unread == {}  # all taken: nothing counted


def test_a_reader_over_its_unread_bytes_is_refused_and_others_are_not():
    async def scenario():
        guard = UnreadResponseGuard(_app(BODY), max_unread_bytes=SLICE_BYTES, unread_timeout_s=30)
        stalled = asyncio.Event()

        async def never_reads(message):
            if message["type"] == "http.response.body" and len(guard.unread) and stalled.is_set():
                await asyncio.sleep(3600)  # the client's socket is full
            stalled.set()

        first = asyncio.create_task(guard(_scope(), None, never_reads))
        while not guard.unread:
            await asyncio.sleep(0.01)
        answers: list[dict] = []

        async def collect(message):
            answers.append(message)

        await guard(_scope(), None, collect)  # the same key: refused
        await guard(_scope(b"Bearer two"), None, collect)  # another key: served
        first.cancel()
        return answers, guard

    answers, guard = asyncio.run(scenario())
    assert answers[0]["status"] == 429
    assert "still unread" in json.loads(answers[1]["body"])["error"]
    assert answers[2]["status"] == 200
    assert guard.unread == {}  # the cancelled response no longer counts


def test_a_reader_that_takes_nothing_is_dropped_after_the_timeout():
    guard = UnreadResponseGuard(_app(BODY), max_unread_bytes=10**9, unread_timeout_s=0.2)

    async def stuck(message):
        if message["type"] == "http.response.body":
            await asyncio.sleep(3600)

    with pytest.raises(TimeoutError):
        asyncio.run(guard(_scope(), None, stuck))
    assert guard.unread == {}


def test_the_callback_reads_its_settings_and_refuses_nonsense(monkeypatch):
    from uvicorn import config

    for parser in ("auto", "httptools"):  # the callback swaps the proxy's parser: undone here
        monkeypatch.setitem(config.HTTP_PROTOCOLS, parser, config.HTTP_PROTOCOLS[parser])
    monkeypatch.setattr(HeaderCappedProtocol, "max_header_bytes", 64 * 1024)
    monkeypatch.setenv("VLMLAB_MAX_UNREAD_BYTES", "1000")
    monkeypatch.setenv("VLMLAB_MAX_HEADER_BYTES", "2048")
    (middleware,) = proxy_middlewares()
    assert middleware.kwargs["max_unread_bytes"] == 1000
    assert config.HTTP_PROTOCOLS["auto"] == "vlmlab.front:HeaderCappedProtocol"
    assert HeaderCappedProtocol.max_header_bytes == 2048
    monkeypatch.setenv("VLMLAB_MAX_HEADER_BYTES", "lots")
    with pytest.raises(ValueError, match="VLMLAB_MAX_HEADER_BYTES must be a number"):
        proxy_middlewares()
