"""The HTTP app that serves adapted models and the black box: Ray Serve with a FastAPI ingress.

Deployments: ``Gateway`` (FastAPI: validation, image decoding, API keys,
OpenAPI at ``/docs``); ``AdapterReplica``, a pool of replicas that each keep
the backend loaded once and up to 8 adapters in memory through Serve's model
multiplexing (a request names its adapter; Serve routes it to a replica that
has it loaded, or loads it, evicting the least recently used); and, when a
keys file is given, the oracle pool's ``OracleReplica`` behind
``/v1/oracle/*`` (see :mod:`vlmlab.serving._oracle_service`).

Every client mistake is a 4xx JSON ``{"error": ...}``: an unknown or
malformed adapter id, a body over the size limit, a missing field, a wrong
type, an image that does not decode.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at runtime.
import base64
import binascii
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

import vlmlab
from vlmlab.serving._classifier import AdaptedModel, AdapterStore, RequestError, decode_image
from vlmlab.serving._keys import ApiKey, load_keys
from vlmlab.serving._oracle_service import OracleService

APP_NAME = "vlmlab-adapters"
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_TOP_K = 1000

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


@api.exception_handler(RequestError)
async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    content = {"error": str(error), **error.extra}
    if error.kind:
        content["type"] = error.kind
    return JSONResponse(status_code=error.status, content=content, headers=error.headers)


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

    async def classify(self, pixels: Any, top_k: int) -> list[dict[str, Any]]:
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
        max_request_bytes: int = MAX_REQUEST_BYTES,
        oracle: Any = None,
        keys: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.replicas = replicas
        self.store = AdapterStore(root) if root is not None else None
        self.max_request_bytes = max_request_bytes
        self._facts: dict[str, dict[str, Any]] = {}  # manifests do not change while served
        self.service = (
            OracleService({n: ApiKey(**k) for n, k in (keys or {}).items()}, oracle)
            if oracle is not None
            else None
        )

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness: the gateway answers, sees its adapter folder, and has an oracle or not."""
        return {
            "status": "ok",
            "adapters": len(self.store.ids()) if self.store else 0,
            "oracle": self.service is not None,
        }

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
        adapter, image, top_k = await self._parse(request)
        if adapter not in self._facts:
            self._facts[adapter] = self.store.describe(adapter)
        facts = self._facts[adapter]
        pixels = decode_image(image)
        handle = self.replicas.options(multiplexed_model_id=adapter)
        predictions = await handle.classify.remote(pixels, top_k)
        return {
            "adapter": adapter,
            "kind": facts["kind"],
            "backend": facts["backend"],
            "model": facts["model"],
            "dataset": facts["dataset"],
            "predictions": predictions,
        }

    # ------------------------------------------------------------ the oracle
    def _oracle(self, request: Request) -> tuple[OracleService, str]:
        if self.service is None:
            raise RequestError(
                404, "this server has no oracle service (start it with a keys file: --keys)"
            )
        return self.service, self.service.admit(request.headers.get("authorization"))

    @api.get("/v1/oracle/metadata")
    async def oracle_metadata(self, request: Request) -> dict[str, Any]:
        """What a black-box user may know: backend, model, token dimension, embedding stats."""
        service, _ = self._oracle(request)
        return await service.metadata()

    @api.get("/v1/oracle/usage")
    async def oracle_usage(self, request: Request) -> dict[str, Any]:
        """The calling key's budget, queries used and left, and registered images."""
        service, name = self._oracle(request)
        return await service.usage(name)

    @api.post("/v1/oracle/phrase-embeddings", openapi_extra=_json_body({"phrase": "string"}))
    async def oracle_phrase(self, request: Request) -> dict[str, Any]:
        """Token embeddings of a phrase (``{"phrase": ..., "binary": false}``); costs no queries."""
        service, _ = self._oracle(request)
        return await service.phrase_embeddings(await self._json(request, "{phrase}"))

    @api.post(
        "/v1/oracle/image-sets",
        openapi_extra=_json_body({"images": {"type": "array", "items": {"type": "string"}}}),
    )
    async def oracle_register(self, request: Request) -> dict[str, Any]:
        """Register images (base64 JSON list or multipart files named ``images``); free."""
        service, name = self._oracle(request)
        kind = _content_type(request)
        if kind == "multipart/form-data":
            form = await self._form(request)
            uploads = form.getlist("images")
            if any(not hasattr(u, "read") for u in uploads):
                raise RequestError(422, "images must be file parts (multipart upload)")
            images: list[Any] = [await u.read() for u in uploads]
        else:
            fields = await self._json(request, "{images: [base64, ...]}")
            sent = fields.get("images")
            if not isinstance(sent, list) or not all(isinstance(i, str) for i in sent):
                raise RequestError(422, "images must be a list of base64 strings")
            images = [_b64(i, f"images[{n}]") for n, i in enumerate(sent)]
        return await service.register(name, images)

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
    async def oracle_logits(self, request: Request) -> dict[str, Any]:
        """Score P soft prompts on a registered image set: P queries from the key's budget."""
        service, name = self._oracle(request)
        fields = await self._json(request, "{contexts, class_names, image_set, indices}")
        return await service.logits(name, fields)

    # ------------------------------------------------------------- parsing
    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            raise RequestError(413, f"the request is over {self.max_request_bytes} bytes")
        body = await request.body()
        if len(body) > self.max_request_bytes:
            raise RequestError(413, f"the request is over {self.max_request_bytes} bytes")
        return body

    async def _json(self, request: Request, shape: str) -> dict[str, Any]:
        body = await self._body(request)
        if _content_type(request) != "application/json":
            raise RequestError(415, f"send application/json: {shape}")
        try:
            fields = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"the body is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise RequestError(422, f"the JSON body must be an object: {shape}")
        return fields

    async def _form(self, request: Request) -> Any:
        await self._body(request)
        try:
            return await request.form()
        except Exception as error:  # the multipart parser's own errors
            raise RequestError(400, f"malformed multipart body: {error}") from None

    async def _parse(self, request: Request) -> tuple[str, bytes, int]:
        kind = _content_type(request)
        if kind == "application/json":
            fields = await self._json(request, "{adapter, image, top_k}")
            image = fields.get("image")
            if image is not None and not isinstance(image, str):
                raise RequestError(422, "image must be a base64 string")
        elif kind == "multipart/form-data":
            fields = dict(await self._form(request))
            upload = fields.get("image")
            if upload is not None and not hasattr(upload, "read"):
                raise RequestError(422, "image must be a file part (multipart upload)")
            image = await upload.read() if upload is not None else None
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
        if isinstance(top_k, str) and top_k.strip().isdigit():
            top_k = int(top_k)
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
):
    """The Serve application: a gateway in front of adapter replicas and, with keys, the oracle.

    Args:
        root: folder of artifact folders (``None``: serve the oracle only).
        keys: a keys file (``vlmlab keys add``); it turns on ``/v1/oracle/*``.
        oracle: the black box behind the oracle endpoints, a backend spec such as
            ``"conse"``, ``"open_clip:ViT-B-16"`` or ``{"name": ..., "pretrained": ...}``.
        oracle_torch_threads: torch threads of each oracle replica (default: its CPUs);
            floats can depend on it, so a client matching it gets its local logits bit for bit.
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
        key_records = {name: key.model_dump() for name, key in load_keys(keys).items()}
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
    # One gateway replica: rate limits and each key's image sets live in it.
    gateway = Gateway.options(num_replicas=1, ray_actor_options={"num_cpus": 0.1})  # type: ignore[attr-defined]
    return gateway.bind(replicas, root, max_request_bytes, oracle_app, key_records)


def build_app(args: dict[str, Any]):
    """``serve run serve/adapted.yaml``: ``args`` are :func:`build_adapters_app`'s."""
    args = dict(args)
    return build_adapters_app(args.pop("root", None), **args)


def serve_adapters(
    root: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    **options: Any,
) -> str:
    """Deploy the app on Ray Serve with an HTTP proxy at ``host:port``; return its base URL.

    Serve keeps one HTTP proxy per cluster: if Serve is already running, its
    proxy (and port) is used as it is.
    """
    from vlmlab.pool import ensure_ray

    ensure_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_adapters_app(root, **options), name=APP_NAME, route_prefix="/")
    try:  # the proxy that actually runs (an earlier serve.start may have chosen another port)
        config = serve.context._global_client.http_config
        host, port = config.host, config.port
    except AttributeError:  # a Ray without that attribute: report what was asked for
        pass
    return f"http://{host}:{port}"
