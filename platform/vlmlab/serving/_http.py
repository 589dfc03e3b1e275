"""The HTTP app that serves adapted models and the black box: Ray Serve with a FastAPI ingress.

Deployments: ``Gateway`` (FastAPI: validation, API keys, limits, OpenAPI at
``/docs``); ``AdapterReplica``, a pool of replicas that each keep
the backend loaded once and up to 8 adapters in memory through Serve's model
multiplexing (a request names its adapter; Serve routes it to a replica that
has it loaded, or loads it, evicting the least recently used); and, when a
keys file is given, the oracle pool's ``OracleReplica`` behind
``/v1/oracle/*`` (see :mod:`vlmlab.serving._oracle_service`) and the
``ImageRegistrar`` that decodes registered image sets. The gateway reads image
headers only: adapter replicas decode the images they classify, the registrar
the sets it stores.

Every client mistake is a 4xx JSON ``{"error": ...}``: an unknown or
malformed adapter id, a body over the size limit, a missing field, a wrong
type, an image that does not decode.

What one request may hold, and for how long (:mod:`vlmlab.serving._limits`):
``/healthz`` holds nothing; an oracle request is authenticated from its
headers, then holds one of its key's ``max_concurrent`` slots; a request with
a body and no key holds one of ``anonymous_slots``. A body is read only after
that, within its timeouts; a request refused before its body was read closes
its connection. Serve's own slots of the gateway replica
(``gateway_max_ongoing_requests``, 1,024) are far more than those: idle or
slow connections cannot exhaust them, and a refusal holds one for an instant.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at runtime.
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

import vlmlab
from vlmlab._memory import trim_memory
from vlmlab.front import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from vlmlab.serving._classifier import (
    AdaptedModel,
    AdapterStore,
    RequestError,
    decode_image,
    probe_image,
)
from vlmlab.serving._keys import ApiKey, load_keys
from vlmlab.serving._limits import (
    RefusalPacer,
    ServerLimits,
    ascii_int,
    content_length,
    parse_json,
    proxy_http_options,
    read_body,
    truncate,
)
from vlmlab.serving._oracle_service import Answer, OracleService, answer_of
from vlmlab.serving._registrar import ImageRegistrar

log = logging.getLogger(__name__)

APP_NAME = "vlmlab-adapters"
MAX_REQUEST_BYTES = ServerLimits().max_request_bytes
MAX_TOP_K = 1000
BIG_REQUEST_BYTES = 1024 * 1024
"""After a request or response this big the gateway hands freed memory back (trim_memory)."""


class Json(JSONResponse):
    """JSON responses; NaN and infinities are written as Python's ``json`` writes them.

    Logits of finite inputs can still overflow in a model; such a response is
    sent (Python's ``json`` and ``HttpOracle`` read it), never a 500.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


api = FastAPI(
    title="vlmlab: adapted models",
    version=vlmlab.__version__,
    description=(
        "Classify images with adapted vision-language models (Black-Box Forgetting, "
        "CraFT and developmental-safety artifacts), and query the black-box model itself "
        "under an API key (`Authorization: Bearer <key>`) with a per-key query budget "
        "and rate limit. Every response names the backend: the offline ConSE stand-in "
        "is not CLIP."
    ),
)


def _has_unread_body(request: Request) -> bool:
    announced = request.headers.get("content-length", "0").strip() not in ("", "0")
    chunked = request.headers.get("transfer-encoding") is not None
    return (announced or chunked) and not getattr(request.state, "body_read", False)


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    content = {"error": truncate(str(error)), **error.extra}
    if error.kind:
        content["type"] = error.kind
    headers = dict(error.headers)
    if _has_unread_body(request):  # refused before its body was read: drop the connection
        headers["Connection"] = "close"
    pacer = getattr(request.app.state, "refusal_pacer", None)
    if pacer is not None:
        await pacer.pause(error.status)
    return Json(status_code=error.status, content=content, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods answer in the one error shape, ``{"error": ...}``."""
    if error.status_code == 404:
        message = f"no route {truncate(request.url.path)}; the API is listed at /docs"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {truncate(request.url.path)}"
    else:
        message = truncate(str(error.detail))
    return Json(status_code=error.status_code, content={"error": message}, headers=error.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter checks (path parameters), in the one error shape."""
    first = error.errors()[0] if error.errors() else {}
    field = ".".join(str(part) for part in first.get("loc", ()))
    message = f"{field}: {first.get('msg', 'invalid')}" if field else "invalid request"
    return Json(status_code=422, content={"error": truncate(message)})


@api.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug, never a client's mistake: logged, and answered as JSON like every error."""
    log.exception("internal error on %s %s", request.method, request.url.path)
    return Json(
        status_code=500,
        content={"error": f"internal error ({type(error).__name__})"},
        headers={"Connection": "close"},
    )


def _json_body(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """OpenAPI for a JSON body the handler parses itself (so its errors stay 4xx JSON)."""
    schema = {k: {"type": v} if isinstance(v, str) else v for k, v in properties.items()}
    return {
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": required or list(properties),
                        "properties": schema,
                    }
                }
            }
        }
    }


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class _Upload:
    """A file part of a multipart form, read."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{name} is not valid base64") from None


class AdapterReplica:
    """Holds the backends and up to 8 adapters (multiplexed by adapter id)."""

    def __init__(self, root: str, backend_kwargs: dict[str, Any] | None = None) -> None:
        self.store = AdapterStore(root)
        self.backend_kwargs = backend_kwargs or {}
        self._oracles: dict[str, Any] = {}

    def _oracle(self, manifest: dict[str, Any]) -> Any:
        from vlmlab.oracle import create_oracle
        from vlmlab.specs import BackendSpec

        backend = BackendSpec.model_validate(manifest["spec"]["backend"])
        key = backend.model_dump_json()
        if key not in self._oracles:  # one backend load per replica, shared by its adapters
            kwargs = {**backend.oracle_kwargs(), **self.backend_kwargs}
            self._oracles[key] = create_oracle(backend.name, **kwargs)
        return self._oracles[key]

    def _load(self, adapter_id: str) -> AdaptedModel:
        oracle = self._oracle(self.store.manifest(adapter_id))
        return AdaptedModel.load(self.store, adapter_id, oracle)

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_model(self, adapter_id: str) -> AdaptedModel:
        return self._load(adapter_id)

    async def classify(
        self, image: bytes, top_k: int, max_pixels: int, max_side: int
    ) -> list[dict[str, Any]]:
        """Decode here (the gateway only read the header) and classify with the adapter."""
        pixels = decode_image(image, max_pixels=max_pixels, max_side=max_side)
        model = await self.get_model(serve.get_multiplexed_model_id())
        return model.classify(pixels, top_k)


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


def build_adapters_app(
    root: str | None,
    *,
    backend_kwargs: dict[str, Any] | None = None,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    keys: str | None = None,
    oracle: str | dict[str, Any] = "conse",
    oracle_replicas: int = 1,
    oracle_cpus: float = 1.0,
    oracle_gpus: float = 0.0,
    oracle_torch_threads: int | None = None,
    limits: ServerLimits | dict[str, Any] | None = None,
    allow_no_keys: bool = False,
):
    """The Serve application: a gateway in front of adapter replicas and, with keys, the oracle.

    Args:
        root: folder of artifact folders (``None``: serve the oracle only).
        max_request_bytes: the largest request body (``limits`` may set it too).
        keys: a keys file (``vlmlab keys add``); it turns on ``/v1/oracle/*``.
        oracle: the black box behind the oracle endpoints, a backend spec such as
            ``"conse"``, ``"open_clip:ViT-B-16"`` or ``{"name": ..., "pretrained": ...}``.
        oracle_torch_threads: torch threads of each oracle replica (default: its CPUs);
            floats can depend on it, so a client matching it gets its local logits bit for bit.
        limits: the gateway's server-wide settings (:class:`ServerLimits`: timeouts,
            slots, chunk size); per-key limits are in the keys file.
        allow_no_keys: serve a keys file that holds no keys (refused otherwise: an
            emptied file would lock every client out).
    """
    from vlmlab.pool import oracle_deployment
    from vlmlab.specs import BackendSpec

    if root is None and keys is None:
        raise ValueError("nothing to serve: give an artifact root, a keys file, or both")
    replicas = None
    if root is not None:
        AdapterStore(root)  # fail now on a missing folder, not inside a replica
        replica = serve.deployment(
            AdapterReplica,
            name="AdapterReplica",
            num_replicas=num_replicas,
            ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        )
        replicas = replica.bind(root, backend_kwargs)  # type: ignore[attr-defined]
    oracle_app, key_records = None, None
    if keys is not None:
        loaded = load_keys(keys, allow_empty=allow_no_keys)
        key_records = {name: key.model_dump() for name, key in loaded.items()}
        backend = BackendSpec.model_validate(
            {"name": oracle} if isinstance(oracle, str) else oracle
        )
        oracle_app = oracle_deployment(
            num_replicas=oracle_replicas, num_cpus=oracle_cpus, num_gpus=oracle_gpus
        ).bind(
            backend.name,
            {**backend.oracle_kwargs(), **(backend_kwargs or {})},
            oracle_torch_threads,
        )
    settings = _server_limits(limits, max_request_bytes)
    registrar = None
    if keys is not None:
        registrar = serve.deployment(
            ImageRegistrar,
            name="ImageRegistrar",
            num_replicas=1,
            max_ongoing_requests=settings.decode_threads,
            ray_actor_options={"num_cpus": 0.1},
        ).bind(settings.decode_threads)  # type: ignore[attr-defined]
    # One gateway replica: rate limits, slots, turns and each key's image sets live in it.
    gateway = Gateway.options(  # type: ignore[attr-defined]
        num_replicas=1,
        max_ongoing_requests=settings.gateway_max_ongoing_requests,
        max_queued_requests=settings.gateway_max_ongoing_requests // 4,
        ray_actor_options={"num_cpus": 0.1},
    )
    return gateway.bind(
        replicas, root, settings.model_dump(), oracle_app, key_records, oracle_replicas, registrar
    )


def _server_limits(
    limits: ServerLimits | dict[str, Any] | None, max_request_bytes: int
) -> ServerLimits:
    settings = limits.model_dump() if isinstance(limits, ServerLimits) else dict(limits or {})
    settings.setdefault("max_request_bytes", max_request_bytes)
    return ServerLimits.model_validate(settings)


def build_app(args: dict[str, Any]):
    """``serve run serve/adapted.yaml``: ``args`` are :func:`build_adapters_app`'s."""
    args = dict(args)
    return build_adapters_app(args.pop("root", None), **args)


def reload_keys(
    keys: str | Path, *, app_name: str = APP_NAME, allow_empty: bool = False
) -> dict[str, list[str]]:
    """Read the keys file again and hand it to the running gateway; returns what changed.

    The file is checked first (:func:`load_keys`): a broken file (unreadable,
    not UTF-8, not YAML, a wrong field, no keys unless ``allow_empty``) changes
    nothing and raises :class:`KeysFileError`. ``vlmlab serve`` calls this on
    SIGHUP and when the file changes; each key's spent queries stay with its name.
    """
    loaded = load_keys(keys, allow_empty=allow_empty)
    records = {name: key.model_dump() for name, key in loaded.items()}
    gateway = serve.get_deployment_handle("Gateway", app_name=app_name)
    changes: dict[str, list[str]] = gateway.reload_keys.remote(records).result()
    return changes


def serve_adapters(
    root: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    **options: Any,
) -> str:
    """Deploy the app on Ray Serve with an HTTP proxy at ``host:port``; return its base URL.

    ``ledger=PATH`` (an option): the query ledger journals to that SQLite file
    (:func:`vlmlab.pool.ledger_actor`), so the keys' spent queries survive a restart;
    or ``ledger="postgresql://..."``: the book in that database, shared by every
    service that names it.

    Serve keeps one HTTP proxy per cluster: if Serve is already running, its
    proxy (and port) is used as it is.
    """
    from vlmlab.pool import ensure_ray, ledger_actor

    # The front door's bounds (header bytes, unread responses) run in Serve's proxy
    # process, which reads this when the Ray it belongs to starts (a local Ray: now).
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ensure_ray(address)
    ledger = options.pop("ledger", None)
    if ledger is not None:  # before any replica asks for the ledger: it opens the journal
        ledger_actor(journal=ledger)
    settings = _server_limits(
        options.get("limits"), options.get("max_request_bytes", MAX_REQUEST_BYTES)
    )
    serve.start(http_options=proxy_http_options(host, port, settings))
    serve.run(build_adapters_app(root, **options), name=APP_NAME, route_prefix="/")
    try:  # the proxy that actually runs (an earlier serve.start may have chosen another port)
        config = serve.context._global_client.http_config
        host, port = config.host, config.port
    except AttributeError:  # a Ray without that attribute: report what was asked for
        pass
    return f"http://{host}:{port}"
