"""What bounds one request before any work: server settings, timed body reads, safe parsing.

Each limit is decided where the work would be done, before doing it: the
gateway (one process that sees every request) for connections, bodies and
counts; the image registrar for image sets, from their headers; the oracle
replica for tokens, with the model's tokenizer.

- **Connections** (server settings, :class:`ServerLimits`): a request body must
  announce its length (411 otherwise) within ``max_request_bytes`` (413), and
  arrive within ``body_timeout_s`` with no gap over ``body_idle_timeout_s``
  (408); the connection is then closed, so a slow client holds nothing longer.
  Requests without a key that carry a body share ``anonymous_slots`` (503 when
  all are held); keyed requests hold one of their key's ``max_concurrent``
  slots (429), taken after authentication and before the body is read.
- **Work** (per key, :data:`vlmlab.serving.KEY_LIMITS`): class names, prompts,
  logits, bytes and tokens of a text, pixels of an image and of a set, images
  and bytes a key holds; each is checked from what the request announces
  (counts, image headers) before anything is decoded or computed (413 naming
  the limit).
- **Parsing**: JSON nested deeper than :data:`MAX_JSON_DEPTH` levels, integers
  written with non-ASCII digits and shapes whose product overflows are a 4xx
  naming the field, never an exception from deep inside a library.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vlmlab.serving._classifier import (
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    RequestError,
    over_limit,
)

MAX_JSON_DEPTH = 32
"""Levels of nesting a JSON body may have (contexts need 3; every field here fewer)."""
MAX_ERROR_CHARS = 1000
"""An error message echoes at most this much of what the client sent."""


class ServerLimits(BaseModel):
    """Server-wide settings of the HTTP gateway (``build_adapters_app(limits=...)``).

    Per-key limits on work live in the keys file (:class:`vlmlab.serving.ApiKey`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_request_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest request body (413 beyond; announced by Content-Length or 411)."""
    max_json_values: int = Field(default=256 * 1024, ge=16)
    """Values in a JSON body, counted before it is parsed (413 beyond). Parsing holds
    the gateway's event loop; a megabyte of numbers is ~10 ms of it, so big arrays
    travel as ``{shape, float32_base64}`` (what ``HttpOracle`` sends)."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """The whole body must arrive within this many seconds of the request (408)."""
    body_idle_timeout_s: float = Field(default=5.0, gt=0)
    """Longest pause between two parts of a body (408)."""
    keep_alive_timeout_s: int = Field(default=5, ge=1)
    """An idle kept-alive connection is closed after this (Serve's HTTP proxy)."""
    refusal_delay_s: float = Field(default=0.5, ge=0)
    """A refusal from the headers alone (401 unknown key, 429 over a key's slots
    or rate, 503 no anonymous slot) is answered after this pause, so a client
    that retries at once (hostile or careless) sends two a second on a
    connection, not hundreds: each costs Serve's proxy and the gateway ~4 ms
    of CPU (measured: 0.51 of a core for ~130 a second), which the oracle's
    calls then lack. It also slows guessing keys."""
    paced_refusals: int = Field(default=64, ge=0)
    """Refusals held for ``refusal_delay_s`` at once; beyond, they are answered at
    once, so the pause can never pile up connections."""
    anonymous_slots: int = Field(default=32, ge=1)
    """Requests with a body and no key (``/v1/classify``) in progress at once (503 beyond)."""
    call_timeout_s: float = Field(default=300.0, gt=0)
    """Longest an oracle call may wait and compute; then 503 and nothing is charged."""
    chunk_prompts: int = Field(default=256, ge=1)
    """An oracle call computes in chunks of at most this many prompts (candidates x
    classes); keys take turns chunk by chunk, so one key's big call delays another
    key's call by one chunk at most, and a call abandoned by its client stops at
    the next chunk."""
    oracle_slots: int | None = Field(default=None, ge=1)
    """Chunks sent to the oracle replicas at once (default: one per replica)."""
    decode_threads: int = Field(default=2, ge=1)
    """Image sets the registrar decodes at once, on as many threads (keys take turns)."""
    max_image_pixels: int = Field(default=MAX_IMAGE_PIXELS, ge=1)
    """Pixels of an image sent to ``/v1/classify`` (keyed uploads: the key's limit)."""
    max_image_side: int = Field(default=MAX_IMAGE_SIDE, ge=1)
    """Longer side of an image sent to ``/v1/classify``."""
    gateway_max_ongoing_requests: int = Field(default=1024, ge=8)
    """Serve's own request slots of the gateway replica. Far above what admitted
    requests can hold (anonymous slots + the keys' slots): a request that is
    refused takes one for the microseconds its refusal takes."""


PACED_STATUSES = frozenset({401, 429, 503})
"""Refusals that :class:`RefusalPacer` answers after a pause."""


class RefusalPacer:
    """Holds refusals for a moment before they are answered, at most ``capacity`` at once.

    A refusal costs the server almost as much as a cheap call (a round trip
    through Serve's proxy), and a client that retries at once can send
    hundreds a second: measured, ~130 a second from 20 hostile clients, which
    kept Serve's proxy and the gateway 0.51 of a core busy on a 2-core machine
    (the oracle got 0.66 of a core, 0.85 once they were paced). Pausing each refusal bounds that
    loop by the number of connections, not by the server's speed. The pause is
    bounded too: past ``capacity`` held refusals, the next is answered at once.
    """

    def __init__(self, delay_s: float, capacity: int) -> None:
        self.delay_s = delay_s
        self.capacity = capacity
        self.held = 0

    async def pause(self, status: int) -> None:
        """Wait ``delay_s`` before a refusal of ``status`` is sent, if it is paced and room is left."""
        if status not in PACED_STATUSES or self.delay_s <= 0 or self.held >= self.capacity:
            return
        self.held += 1
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.held -= 1


def ascii_int(value: str, *, max_digits: int = 18) -> int | None:
    """``value`` as a non-negative int if it is plain ASCII digits, else None.

    ``str.isdigit`` accepts '²' and other Unicode digits that ``int`` refuses
    (and ``int`` accepts Arabic-Indic ones a header should never hold).
    """
    text = value.strip()
    if not text or len(text) > max_digits or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a parsed JSON value, counted without recursion (stops past ``limit``)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(body: bytes, shape: str, max_values: int | None = None) -> dict[str, Any]:
    """A JSON object from ``body``; every way it can be wrong is a 400, 413 or 422 naming it.

    ``max_values`` bounds the parse before it starts: values are counted as the
    commas in the body (an upper bound on its numbers; base64 strings have none).
    """
    if max_values is not None:
        values = body.count(b",") + 1
        if values > max_values:
            raise over_limit(
                "max_json_values",
                values,
                max_values,
                "values in the JSON body (send big arrays as {shape, float32_base64})",
            )
    try:
        fields = json.loads(body)
    except RecursionError:
        raise RequestError(
            400, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        ) from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError, 4300-digit integers
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    if json_depth(fields) > MAX_JSON_DEPTH:
        raise RequestError(
            400, f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        )
    if not isinstance(fields, dict):
        raise RequestError(422, f"the JSON body must be an object: {shape}")
    return fields


def content_length(headers: Any, max_bytes: int) -> int:
    """The announced body length: 411 when a body has none, 413 over ``max_bytes``.

    Announced lengths let the gateway refuse a big body before reading a byte of it.
    """
    announced = headers.get("content-length")
    if announced is None:
        if headers.get("transfer-encoding") is not None:
            raise RequestError(
                411, "send the body with a Content-Length (chunked uploads are refused)"
            )
        return 0
    length = ascii_int(announced)
    if length is None:
        raise RequestError(400, "Content-Length must be a number of bytes in ASCII digits")
    if length > max_bytes:
        raise RequestError(413, f"the request is over {max_bytes} bytes (max_request_bytes)")
    return length


async def read_body(
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    length: int,
    limits: ServerLimits,
) -> bytes:
    """Read an announced body of ``length`` bytes, or fail on time (408) or size (413).

    The whole body must arrive within ``body_timeout_s`` and no pause may last
    ``body_idle_timeout_s``: a client that announces a body and sends it slowly,
    or never, holds its slot that long at most.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.body_timeout_s
    parts: list[bytes] = []
    size = 0
    more = True
    while more:
        wait = min(limits.body_idle_timeout_s, deadline - loop.time())
        try:
            if wait <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(receive(), wait)
        except TimeoutError:
            raise RequestError(
                408,
                f"the request body did not arrive in time ({size} of {length} bytes; "
                f"body_timeout_s {limits.body_timeout_s:g}, body_idle_timeout_s "
                f"{limits.body_idle_timeout_s:g})",
            ) from None
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError  # the client is gone: nothing to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > length or size > limits.max_request_bytes:
            raise RequestError(413, "the body is longer than its Content-Length")
        parts.append(chunk)
        more = bool(message.get("more_body", False))
    if size != length:
        raise RequestError(400, f"the body has {size} bytes, its Content-Length says {length}")
    return b"".join(parts)


def truncate(message: str) -> str:
    """An error message short enough to send back whatever the client put in it."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return message[:MAX_ERROR_CHARS] + f"... ({len(message) - MAX_ERROR_CHARS} more characters)"


def proxy_http_options(
    host: str = "127.0.0.1", port: int = 8000, limits: ServerLimits | None = None
) -> dict[str, Any]:
    """``serve.start``'s HTTP options for this app: the address, and idle connections closed.

    Serve keeps one HTTP proxy per cluster: these apply when the proxy starts here.
    """
    settings = limits or ServerLimits()
    return {"host": host, "port": port, "keep_alive_timeout_s": settings.keep_alive_timeout_s}
