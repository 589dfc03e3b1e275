"""``HttpOracle``: the oracle service over HTTP, as an :class:`~vlmlab.oracle.Oracle`.

Any method runs unchanged against a remote black box::

    oracle = HttpOracle("http://127.0.0.1:8000", key=os.environ["VLMLAB_API_KEY"])

Two ledgers count the same queries: the server's (the key's budget, which
it enforces) and this client's own :class:`~vlmlab.oracle.QueryLedger` (per
``budget_key``, as a method expects of any oracle). A call is checked here
first, so malformed input and a client-side budget refuse before anything is
sent. Arrays travel as base64 float32, so logits are the server's bit for bit.
Rate-limited (429) and unavailable (503) calls are retried after the wait the
server asks for; nothing is charged for them. A call over one of the key's
limits raises :class:`~vlmlab.errors.LimitExceededError` naming the limit. A
server that restarted (and so forgot its image sets) is sent a set again the
first time a call needs it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlmlab.errors import BudgetExceededError, LimitExceededError
from vlmlab.oracle import (
    DEFAULT_BUDGET_KEY,
    ImageSet,
    ImageSetRef,
    OracleMetadata,
    QueryLedger,
    check_call,
    image_set_ref,
    metered,
)
from vlmlab.serving._oracle_service import decode_array, encode_array


class HttpOracle:
    """An Oracle served by ``vlmlab serve --keys`` at ``url``, called with API key ``key``.

    Args:
        url: the server's base URL (``http://host:port``).
        key: the API key (``vlmlab keys add`` printed it).
        timeout: seconds to wait for one response.
        retries: how many times a 429 or 503 is retried.
    """

    def __init__(self, url: str, key: str, *, timeout: float = 300.0, retries: int = 8) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {key}"
        self._ledger = QueryLedger()
        self._image_sets: dict[str, ImageSet] = {}
        described = self._request("GET", "/v1/oracle/metadata")
        self._metadata = OracleMetadata(
            backend=described["backend"],
            model=described["model"],
            token_dim=described["token_dim"],
            context_length=described["context_length"],
            embedding_mean=torch.tensor(described["embedding_mean"], dtype=torch.float32),
            embedding_std=described["embedding_std"],
        )

    @property
    def metadata(self) -> OracleMetadata:
        return self._metadata

    @property
    def ledger(self) -> QueryLedger:
        return self._ledger

    def usage(self) -> dict[str, Any]:
        """The server's account of this key: budget, queries used and left."""
        return self._request("GET", "/v1/oracle/usage")

    def phrase_embeddings(self, phrase: str) -> torch.Tensor:
        body = self._request(
            "POST", "/v1/oracle/phrase-embeddings", json={"phrase": phrase, "binary": True}
        )
        return torch.from_numpy(decode_array(body["embeddings"], "embeddings")[0].copy())

    def register_images(self, images: ImageSet) -> ImageSetRef:
        # A lazy set is materialized: its pixels go up in one request and the server
        # names the set by their hash, which the client must match.
        images = images.materialized() if isinstance(images, ImageSet) else images
        ref = image_set_ref(images)
        if ref.id not in self._image_sets:
            self._upload(images)
            self._image_sets[ref.id] = images  # kept: a restarted server is sent it again
        return ref

    def _upload(self, images: ImageSet) -> None:
        from PIL import Image

        # One request a set (a set is one content hash); a server's body limit
        # (`vlmlab serve --max-request-mb`) caps its size: 413 says so.
        encoded = []
        assert isinstance(images.pixels, np.ndarray)  # register_images materialized a lazy set
        for pixels in images.pixels:  # PNG: lossless, so the server hashes the same pixels
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())
        body = self._request("POST", "/v1/oracle/image-sets", json={"images": encoded})
        if body["image_set"] != images.ref.id:
            raise RuntimeError(
                f"the server registered set {body['image_set']!r}, expected {images.ref.id!r}"
            )

    def logits(
        self,
        contexts: torch.Tensor,
        class_names: Sequence[str],
        image_set: ImageSetRef | str,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        budget_key: str = DEFAULT_BUDGET_KEY,
    ) -> torch.Tensor:
        sizes = {set_id: len(images) for set_id, images in self._image_sets.items()}
        call = check_call(contexts, class_names, image_set, indices, self._metadata, sizes)
        request = {
            "contexts": encode_array(call.contexts.numpy(), binary=True),
            "class_names": call.names,
            "image_set": call.set_id,
        }
        if call.index is not None:
            request["indices"] = call.index.tolist()
        with metered(self._ledger, budget_key, **call.charges):
            try:
                body = self._request("POST", "/v1/oracle/logits", json=request)
            except KeyError:  # the server restarted and forgot the set: send it once more
                self._upload(self._image_sets[call.set_id])
                body = self._request("POST", "/v1/oracle/logits", json=request)
        return torch.from_numpy(decode_array(body["logits"], "logits")[0].copy())

    # ------------------------------------------------------------- plumbing
    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One call; a 429 or 503 (rate, slots, a replica restarting) is retried after the
        server's ``Retry-After`` (at most 30 s), ``retries`` times; anything else is final."""
        import tenacity

        def wait(state: tenacity.RetryCallState) -> float:
            response = state.outcome.result() if state.outcome else None
            default = 0.5 * 2 ** (state.attempt_number - 1)
            header = response.headers.get("Retry-After") if response is not None else None
            try:
                return min(float(header) if header is not None else default, 30.0)
            except ValueError:  # an HTTP date: not sent by vlmlab's server
                return min(default, 30.0)

        response = tenacity.Retrying(
            retry=tenacity.retry_if_result(lambda r: r.status_code in (429, 503)),
            stop=tenacity.stop_after_attempt(self.retries + 1),
            wait=wait,
            retry_error_callback=_last_answer,
        )(self._session.request, method, self.url + path, timeout=self.timeout, **kwargs)
        if response.ok:
            return response.json()
        raise _error(response)


def _last_answer(state: Any) -> Any:
    """When the retries are spent: the server's last answer, to be raised as its error."""
    return state.outcome.result()


def _error(response: Any) -> Exception:
    """The exception a local oracle would have raised for the same mistake."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    message = body.get("error", response.text[:500])
    kind = body.get("type")
    if kind == "BudgetExceededError":
        return BudgetExceededError(
            "server", body["requested"], body["queries_left"], body["budget"]
        )
    if kind == "LimitExceededError" and {"limit", "requested", "allowed"} <= set(body):
        what = message.rsplit(": ", 1)[0]  # the server's message ends ": N is over the limit ..."
        return LimitExceededError(body["limit"], body["requested"], body["allowed"], what)
    if kind == "KeyError" or response.status_code == 404:
        return KeyError(message)
    if kind == "TypeError":
        return TypeError(message)
    if response.status_code in (401, 403):
        return PermissionError(f"{response.status_code}: {message}")
    if 400 <= response.status_code < 500:
        return ValueError(message)
    return RuntimeError(f"oracle service answered {response.status_code}: {message}")
