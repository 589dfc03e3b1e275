"""The ``Gateway`` deployment: the HTTP front of adapted models and of the black box.

Its routes (FastAPI, the ``api`` of :mod:`vlmlab.serving._http_api`) validate
requests, admit them (:mod:`vlmlab.serving._limits`: anonymous slots, or the
key's slots through :class:`~vlmlab.serving._oracle_service.OracleService`),
read their bodies within the server's limits, and forward each to the
``AdapterReplica`` pool with its adapter id, or to the oracle service. Apart
from :mod:`vlmlab.serving._http`, which composes the application and deploys
it: this is the code that runs inside the gateway's one replica.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at runtime.
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from ray import serve
from starlette.types import Message

from vlmlab._memory import trim_memory
from vlmlab.serving._classifier import AdapterStore, RequestError, probe_image
from vlmlab.serving._http_api import _b64, _content_type, _json_body, _Upload, api
from vlmlab.serving._keys import ApiKey
from vlmlab.serving._limits import (
    RefusalPacer,
    ServerLimits,
    ascii_int,
    content_length,
    parse_json,
    read_body,
)
from vlmlab.serving._oracle_service import OracleService
from vlmlab.serving._oracle_wire import Answer
from vlmlab.serving._remote_calls import answer_of

MAX_TOP_K = 1000
BIG_REQUEST_BYTES = 1024 * 1024
"""After a request or response this big the gateway hands freed memory back (trim_memory)."""


@serve.deployment
@serve.ingress(api)
class Gateway:
    """Validates requests and forwards each to the replica pool with its adapter id."""

    def __init__(
        self,
        replicas: Any,
        root: str | None,
        limits: dict[str, Any] | None = None,
        oracle: Any = None,
        keys: dict[str, dict[str, Any]] | None = None,
        oracle_replicas: int = 1,
        registrar: Any = None,
    ) -> None:
        self.replicas = replicas
        self.store = AdapterStore(root) if root is not None else None
        self.limits = ServerLimits.model_validate(limits or {})
        self._anonymous_free = self.limits.anonymous_slots
        api.state.refusal_pacer = RefusalPacer(
            self.limits.refusal_delay_s, self.limits.paced_refusals
        )
        self._facts: dict[str, dict[str, Any]] = {}  # manifests do not change while served
        self._trim: asyncio.TimerHandle | None = None
        self.service = (
            OracleService(
                {n: ApiKey(**k) for n, k in (keys or {}).items()},
                oracle,
                limits=self.limits,
                oracle_replicas=oracle_replicas,
                registrar=registrar,
            )
            if oracle is not None
            else None
        )

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness: the gateway answers, sees its adapter folder, and has an oracle or not.

        Answered outside every request slot, with no body and no call to another
        process: busy or stalled clients never delay it.
        """
        return {
            "status": "ok",
            "adapters": len(self.store.ids()) if self.store else 0,
            "oracle": self.service is not None,
        }

    async def reload_keys(self, keys: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        """Serve these key records from now on (:func:`reload_keys` calls it); what changed."""
        if self.service is None:
            raise ValueError("this server has no oracle service: it was started without keys")
        return self.service.replace_keys({n: ApiKey(**k) for n, k in keys.items()})

    # ----------------------------------------------------------- admission
    @contextlib.asynccontextmanager
    async def _anonymous(self) -> AsyncIterator[None]:
        """One of the slots that requests with a body and no key share (503 when none is free)."""
        if self._anonymous_free <= 0:
            raise RequestError(
                503,
                f"{self.limits.anonymous_slots} requests without a key are in progress, the "
                "server's limit anonymous_slots; retry shortly",
                headers={"Retry-After": "1"},
            )
        self._anonymous_free -= 1
        try:
            yield
        finally:
            self._anonymous_free += 1

    @contextlib.asynccontextmanager
    async def _keyed(self, request: Request) -> AsyncIterator[tuple[OracleService, str]]:
        """The key's slot, from authentication (headers only) until the response."""
        if self.service is None:
            raise RequestError(
                404, "this server has no oracle service (start it with a keys file: --keys)"
            )
        name = self.service.admit(request.headers.get("authorization"))
        try:
            yield self.service, name
        finally:
            self.service.leave(name)

    def _after_big(self) -> None:
        """Hand freed memory back to the OS a moment after a big request (once per burst)."""
        if self._trim is None:
            loop = asyncio.get_running_loop()

            def trim() -> None:
                self._trim = None
                loop.run_in_executor(None, trim_memory)

            self._trim = loop.call_later(2.0, trim)

    @api.get("/v1/adapters")
    async def adapters(self) -> dict[str, Any]:
        """Every adapter: kind, backend, model, dataset, classes (and forget / target sets)."""
        store = self.store
        return {"adapters": [store.describe(i) for i in store.ids()] if store else []}

    @api.post(
        "/v1/classify",
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["adapter", "image"],
                            "properties": {
                                "adapter": {"type": "string"},
                                "image": {"type": "string", "description": "base64 image file"},
                                "top_k": {"type": "integer", "minimum": 1, "default": 5},
                            },
                        }
                    },
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["adapter", "image"],
                            "properties": {
                                "adapter": {"type": "string"},
                                "image": {"type": "string", "format": "binary"},
                                "top_k": {"type": "integer", "minimum": 1, "default": 5},
                            },
                        }
                    },
                }
            }
        },
    )
    async def classify(self, request: Request) -> dict[str, Any]:
        """Classify one image (multipart upload or base64 JSON) with one adapter."""
        if self.store is None:
            raise RequestError(
                404, "this server serves no adapters (start it with an artifact root)"
            )
        async with self._anonymous():
            adapter, image, top_k = await self._parse(request)
            if adapter not in self._facts:
                self._facts[adapter] = self.store.describe(adapter)
            facts = self._facts[adapter]
            most, side = self.limits.max_image_pixels, self.limits.max_image_side
            probe_image(image, max_pixels=most, max_side=side)  # the header: refused here
            handle = self.replicas.options(multiplexed_model_id=adapter)
            # Decoded by the adapter replica: the gateway never holds pixels.
            predictions = await answer_of(handle.classify.remote(image, top_k, most, side))
        return {
            "adapter": adapter,
            "kind": facts["kind"],
            "backend": facts["backend"],
            "model": facts["model"],
            "dataset": facts["dataset"],
            "predictions": predictions,
        }

    # ------------------------------------------------------------ the oracle
    @api.get("/v1/oracle/metadata")
    async def oracle_metadata(self, request: Request) -> dict[str, Any]:
        """What a black-box user may know: backend, model, token dimension, embedding stats."""
        async with self._keyed(request) as (service, _):
            return await service.metadata()

    @api.get("/v1/oracle/usage")
    async def oracle_usage(self, request: Request) -> dict[str, Any]:
        """The calling key's budget (queries used, reserved, left), images and limits."""
        async with self._keyed(request) as (service, name):
            return await service.usage(name)

    @api.post("/v1/oracle/phrase-embeddings", openapi_extra=_json_body({"phrase": "string"}))
    async def oracle_phrase(self, request: Request) -> Any:
        """Token embeddings of a phrase (``{"phrase": ..., "binary": false}``); costs no queries."""
        async with self._keyed(request) as (service, name):
            fields = await self._json(request, "{phrase}")
            return await self._render(await service.phrase_embeddings(name, fields))

    @api.post(
        "/v1/oracle/image-sets",
        openapi_extra=_json_body({"images": {"type": "array", "items": {"type": "string"}}}),
    )
    async def oracle_register(self, request: Request) -> dict[str, Any]:
        """Register images (base64 JSON list or multipart files named ``images``); free."""
        async with self._keyed(request) as (service, name):
            kind = _content_type(request)
            if kind == "multipart/form-data":
                uploads = (await self._form(request)).get("images", [])
                if any(not isinstance(u, _Upload) for u in uploads):
                    raise RequestError(422, "images must be file parts (multipart upload)")
                images: list[Any] = [u.data for u in uploads]
            else:
                fields = await self._json(request, "{images: [base64, ...]}")
                sent = fields.get("images")
                if not isinstance(sent, list) or not all(isinstance(i, str) for i in sent):
                    raise RequestError(422, "images must be a list of base64 strings")
                images = [_b64(i, f"images[{n}]") for n, i in enumerate(sent)]
            return await service.register(name, images)

    @api.delete("/v1/oracle/image-sets/{set_id}")
    async def oracle_delete(self, set_id: str, request: Request) -> dict[str, Any]:
        """Forget one of the key's image sets: its images no longer count against its limits."""
        async with self._keyed(request) as (service, name):
            return await service.delete(name, set_id)

    @api.post(
        "/v1/oracle/logits",
        openapi_extra=_json_body(
            {
                "contexts": {"description": "P x m x D nested list or {shape, float32_base64}"},
                "class_names": {"type": "array", "items": {"type": "string"}},
                "image_set": "string",
                "indices": {"type": "array", "items": {"type": "integer"}},
            },
            required=["contexts", "class_names", "image_set"],
        ),
    )
    async def oracle_logits(self, request: Request) -> Any:
        """Score P soft prompts on a registered image set: P queries from the key's budget."""
        async with self._keyed(request) as (service, name):
            fields = await self._json(request, "{contexts, class_names, image_set, indices}")
            return await self._render(await service.logits(name, fields))

    async def _render(self, answer: Answer) -> Response:
        """The answer as JSON, rendered on a thread (a big one in blocks: the loop runs on)."""
        body = await asyncio.get_running_loop().run_in_executor(None, answer.render)
        if len(body) > BIG_REQUEST_BYTES:
            self._after_big()
        return Response(body, media_type="application/json")

    # ------------------------------------------------------------- parsing
    async def _body(self, request: Request) -> bytes:
        """The body, within the server's size and time limits (411, 413, 408)."""
        length = content_length(request.headers, self.limits.max_request_bytes)
        body = await read_body(request.receive, length, self.limits)
        request.state.body_read = True
        if length > BIG_REQUEST_BYTES:
            self._after_big()
        return body

    async def _json(self, request: Request, shape: str) -> dict[str, Any]:
        if _content_type(request) != "application/json":
            raise RequestError(415, f"send application/json: {shape}")
        return parse_json(await self._body(request), shape, self.limits.max_json_values)

    async def _form(self, request: Request) -> dict[str, list[Any]]:
        """The multipart form's parts by name: strings, and file parts as :class:`_Upload`."""
        body = await self._body(request)
        sent = False

        async def replay() -> Message:  # the body, once more, for the multipart parser
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, receive=replay).form()
        except Exception as error:  # the multipart parser's own errors
            raise RequestError(400, f"malformed multipart body: {error}") from None
        try:  # file parts read into memory (within the body's size), the form closed
            parts: dict[str, list[Any]] = {}
            for name, value in form.multi_items():
                parts.setdefault(name, []).append(
                    _Upload(await value.read()) if hasattr(value, "read") else value
                )
            return parts
        finally:
            await form.close()

    async def _parse(self, request: Request) -> tuple[str, bytes, int]:
        kind = _content_type(request)
        if kind == "application/json":
            fields = await self._json(request, "{adapter, image, top_k}")
            image = fields.get("image")
            if image is not None and not isinstance(image, str):
                raise RequestError(422, "image must be a base64 string")
        elif kind == "multipart/form-data":
            fields = {name: values[-1] for name, values in (await self._form(request)).items()}
            upload = fields.get("image")
            if upload is not None and not isinstance(upload, _Upload):
                raise RequestError(422, "image must be a file part (multipart upload)")
            image = upload.data if upload is not None else None
        else:
            raise RequestError(
                415, "send application/json (base64 image) or multipart/form-data (image file)"
            )
        missing = [
            name
            for name, value in (("adapter", fields.get("adapter")), ("image", image))
            if value is None
        ]
        if missing:
            raise RequestError(422, f"missing field(s): {', '.join(missing)}")
        adapter = fields["adapter"]
        if not isinstance(adapter, str):
            raise RequestError(422, "adapter must be a string (an id from GET /v1/adapters)")
        assert self.store is not None  # classify() answers 404 without adapters
        self.store.folder(adapter)  # 400 malformed, 404 unknown
        if isinstance(image, str):
            image = _b64(image, "image")
        if not isinstance(image, bytes):
            raise RequestError(422, "image must be a base64 string or a file part")
        top_k = fields.get("top_k", 5)
        if kind == "multipart/form-data" and isinstance(top_k, str):  # form fields are text
            # Plain ASCII digits only: no spaces, signs, '_' or other scripts' digits.
            top_k = ascii_int(top_k, max_digits=6) if top_k == top_k.strip() else None
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise RequestError(422, f"top_k must be an integer in [1, {MAX_TOP_K}]")
        return adapter, image, top_k
