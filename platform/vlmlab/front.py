"""Bounds at the front door: Ray Serve's HTTP proxy, before the gateway sees a request.

Two things happen in the proxy that no deployment can bound, because they
happen before a request reaches one or after its response has left it:

- **Header bytes.** The proxy's HTTP parser (uvicorn with ``httptools``) reads
  a request's whole header block into memory before anything sees it: a 64 MB
  ``Authorization`` header is held whole before the gateway can answer 401.
  :class:`HeaderCappedProtocol` answers 431 and closes the connection once
  the header block passes ``max_header_bytes`` (``h11``, uvicorn's other
  parser, already caps it at 16 KiB).
- **Responses nobody reads.** The gateway hands its response to the proxy and
  frees the key's slot; a client that never reads leaves the whole body in the
  proxy. :class:`UnreadResponseGuard` writes bodies in slices as the client
  reads them, counts the bytes each key has waiting, refuses a key's new
  requests with 429 while they pass ``max_unread_bytes``, and drops a
  connection whose reader makes no progress for ``unread_timeout_s``. Freed
  memory goes back to the OS after big responses (``malloc_trim``).

This module imports nothing heavy (no torch, no Ray): the proxy loads it.
Both bounds are installed by :func:`proxy_middlewares`, which Ray Serve calls in each
proxy process when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names it
(:data:`PROXY_CALLBACK`). :func:`vlmlab.pool.ensure_ray` (and
:func:`vlmlab.serving.serve_adapters`) set that variable for the local Ray they
start; a cluster started with ``ray start`` needs it in its environment
(``cluster.yaml`` sets it). The settings are environment variables
read in the proxy process (:data:`MAX_HEADER_BYTES_ENV`,
:data:`MAX_UNREAD_BYTES_ENV`, :data:`UNREAD_TIMEOUT_ENV`).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
from typing import Any

from starlette.middleware import Middleware

from vlmlab._memory import trim_memory

log = logging.getLogger(__name__)

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "vlmlab.front:proxy_middlewares"
"""The value of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` that installs these bounds."""
MAX_HEADER_BYTES_ENV = "VLMLAB_MAX_HEADER_BYTES"
MAX_HEADER_BYTES = 64 * 1024
"""Default cap of a request's header block (request line and headers), bytes."""
MAX_UNREAD_BYTES_ENV = "VLMLAB_MAX_UNREAD_BYTES"
MAX_UNREAD_BYTES = 64 * 1024 * 1024
"""Default cap of the response bytes one key may have waiting for its reader."""
UNREAD_TIMEOUT_ENV = "VLMLAB_UNREAD_TIMEOUT_S"
UNREAD_TIMEOUT_S = 30.0
"""Default longest a response may wait for its reader to take the next slice."""
SLICE_BYTES = 256 * 1024
"""A body is written in slices this big, each once the reader took the last."""
BIG_RESPONSE_BYTES = 1024 * 1024
"""After a response this big, the proxy hands freed memory back to the OS."""


def _setting(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"${name} must be a number, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"${name} must be positive, got {text!r}")
    return value


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's proxy callback: cap header bytes, and guard unread responses."""
    install_header_cap(int(_setting(MAX_HEADER_BYTES_ENV, MAX_HEADER_BYTES)))
    return [
        Middleware(
            UnreadResponseGuard,
            max_unread_bytes=int(_setting(MAX_UNREAD_BYTES_ENV, MAX_UNREAD_BYTES)),
            unread_timeout_s=_setting(UNREAD_TIMEOUT_ENV, UNREAD_TIMEOUT_S),
        )
    ]


# ------------------------------------------------------------------ headers
def install_header_cap(max_header_bytes: int) -> bool:
    """Make uvicorn's ``httptools`` parser (its ``auto`` choice) cap header bytes.

    Runs in the proxy process before its server loads its configuration (the
    callback runs first); whether the cap was installed (False without
    ``httptools``: uvicorn then uses ``h11``, which caps headers itself).
    """
    try:
        from uvicorn import config as uvicorn_config
        from uvicorn.protocols.http import httptools_impl  # noqa: F401 - needs httptools
    except ImportError:
        return False
    HeaderCappedProtocol.max_header_bytes = max_header_bytes
    path = f"{__name__}:HeaderCappedProtocol"
    uvicorn_config.HTTP_PROTOCOLS["auto"] = path
    uvicorn_config.HTTP_PROTOCOLS["httptools"] = path
    return True


def _refusal(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn's h11 parser caps headers itself
    HttpToolsProtocol = object  # type: ignore[assignment,misc]


class HeaderCappedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering 431 once a header block passes its cap.

    Bytes are counted while a request's head is incomplete (from the end of
    the last request, or the connection's start, to the end of the headers),
    by whole reads; a read that ended the request before is not counted (it
    is mostly that request's body), so the parser holds at most the cap plus
    two reads of a head.
    """

    max_header_bytes = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_open = True
        self._ended_in_read = False

    def on_message_begin(self) -> None:
        self._head_open = True
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_open = True  # the next request's head starts here
        self._ended_in_read = True

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        self._ended_in_read = False
        super().data_received(data)
        if not self._head_open or self._ended_in_read or self.transport.is_closing():
            return  # a read that ended a request is mostly its body: not counted
        self._head_bytes += len(data)
        if self._head_bytes > self.max_header_bytes:
            self.transport.write(
                _refusal(
                    "431 Request Header Fields Too Large",
                    f"the request's headers are over {self.max_header_bytes} bytes "
                    f"(${MAX_HEADER_BYTES_ENV})",
                )
            )
            self.transport.close()


# ---------------------------------------------------------------- responses
def _reader(scope: dict[str, Any]) -> str:
    """Whose bytes these are: a digest of the bearer credential, else the client's address."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return "key:" + hashlib.sha256(value).hexdigest()[:24]
    client = scope.get("client") or ("?", 0)
    return f"addr:{client[0]}"


class UnreadResponseGuard:
    """An ASGI middleware of the proxy: a key's unread response bytes are bounded.

    A body is written in :data:`SLICE_BYTES` slices; uvicorn makes each write
    wait while the client's socket is full, so the bytes not yet taken are
    the ones this guard counts per reader (:func:`_reader`). A reader over
    ``max_unread_bytes`` gets 429 for new requests until its clients read; a
    slice that waits ``unread_timeout_s`` ends its connection, which frees it.
    """

    def __init__(self, app: Any, max_unread_bytes: int, unread_timeout_s: float) -> None:
        self.app = app
        self.max_unread_bytes = max_unread_bytes
        self.unread_timeout_s = unread_timeout_s
        self.unread: dict[str, int] = {}
        self._trim: asyncio.TimerHandle | None = None

    def _add(self, reader: str, size: int) -> None:
        left = self.unread.get(reader, 0) + size
        if left > 0:
            self.unread[reader] = left
        else:
            self.unread.pop(reader, None)

    def _after_big(self) -> None:
        if self._trim is None:
            loop = asyncio.get_running_loop()

            def trim() -> None:
                self._trim = None
                # A dropped connection ends its body's writer with an exception, whose
                # traceback holds the body in a reference cycle: only the cycle collector
                # frees it, and an idle proxy may not run it for minutes.
                gc.collect()
                loop.run_in_executor(None, trim_memory)

            self._trim = loop.call_later(2.0, trim)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reader = _reader(scope)
        waiting = self.unread.get(reader, 0)
        if waiting > self.max_unread_bytes:
            await self._refuse(send, waiting)
            return

        async def sliced(message: dict[str, Any]) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            body: bytes = message.get("body", b"")
            more = bool(message.get("more_body", False))
            if len(body) <= SLICE_BYTES:
                await send(message)
                return
            self._add(reader, len(body))
            sent = 0
            try:
                while sent < len(body):
                    piece = body[sent : sent + SLICE_BYTES]
                    last = sent + len(piece) >= len(body)
                    part = {
                        "type": "http.response.body",
                        "body": piece,
                        "more_body": more or not last,
                    }
                    try:
                        await asyncio.wait_for(send(part), self.unread_timeout_s)
                    except TimeoutError:
                        log.warning(
                            "dropped a connection whose reader took nothing for %.0f s "
                            "(%d bytes unread)",
                            self.unread_timeout_s,
                            len(body) - sent,
                        )
                        raise
                    sent += len(piece)
                    self._add(reader, -len(piece))
            finally:
                self._add(reader, sent - len(body))
                self._after_big()

        await self.app(scope, receive, sliced)

    async def _refuse(self, send: Any, waiting: int) -> None:
        body = json.dumps(
            {
                "error": f"{waiting} bytes of this key's earlier responses are still unread, "
                f"over the server's limit of {self.max_unread_bytes} (${MAX_UNREAD_BYTES_ENV}); "
                "read them, or close those connections, then retry"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"5"),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
