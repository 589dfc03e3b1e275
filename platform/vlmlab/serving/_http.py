"""The HTTP app that serves adapted models: Ray Serve with a FastAPI ingress.

Two deployments: ``Gateway`` (FastAPI: validation, image decoding, OpenAPI at
``/docs``) and ``AdapterReplica``, a pool of replicas that each keep the
backend loaded once and up to 8 adapters in memory through
Serve's model multiplexing (a request names its adapter; Serve routes it to
a replica that has it loaded, or loads it, evicting the least recently used).

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

APP_NAME = "vlmlab-adapters"
MAX_REQUEST_BYTES = 8 * 1024 * 1024
MAX_TOP_K = 1000

api = FastAPI(
    title="vlmlab: adapted models",
    version=vlmlab.__version__,
    description=(
        "Classify images with adapted vision-language models (Black-Box Forgetting, "
        "CraFT and developmental-safety artifacts). Every response names the backend: "
        "the offline ConSE stand-in is not CLIP."
    ),
)


@api.exception_handler(RequestError)
async def _request_error(_: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"error": str(error)})


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
        self, replicas: Any, root: str, max_request_bytes: int = MAX_REQUEST_BYTES
    ) -> None:
        self.replicas = replicas
        self.store = AdapterStore(root)
        self.max_request_bytes = max_request_bytes
        self._facts: dict[str, dict[str, Any]] = {}  # manifests do not change while served

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness: the gateway answers and sees its adapter folder."""
        return {"status": "ok", "adapters": len(self.store.ids())}

    @api.get("/v1/adapters")
    async def adapters(self) -> dict[str, Any]:
        """Every adapter: kind, backend, model, dataset, classes (and forget / target sets)."""
        return {"adapters": [self.store.describe(i) for i in self.store.ids()]}

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

    async def _parse(self, request: Request) -> tuple[str, bytes, int]:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            raise RequestError(413, f"the request is over {self.max_request_bytes} bytes")
        body = await request.body()
        if len(body) > self.max_request_bytes:
            raise RequestError(413, f"the request is over {self.max_request_bytes} bytes")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            try:
                fields = json.loads(body)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise RequestError(400, f"the body is not valid JSON: {error}") from None
            if not isinstance(fields, dict):
                raise RequestError(422, "the JSON body must be an object: {adapter, image, top_k}")
            image = fields.get("image")
            if image is not None and not isinstance(image, str):
                raise RequestError(422, "image must be a base64 string")
        elif kind == "multipart/form-data":
            try:
                form = await request.form()
            except Exception as error:  # the multipart parser's own errors
                raise RequestError(400, f"malformed multipart body: {error}") from None
            fields = dict(form)
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
        self.store.folder(adapter)  # 400 malformed, 404 unknown
        if isinstance(image, str):
            try:
                image = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(422, "image is not valid base64") from None
        top_k = fields.get("top_k", 5)
        if isinstance(top_k, str) and top_k.strip().isdigit():
            top_k = int(top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
            raise RequestError(422, f"top_k must be an integer in [1, {MAX_TOP_K}]")
        return adapter, image, top_k


def build_adapters_app(
    root: str,
    *,
    backend_kwargs: dict[str, Any] | None = None,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_request_bytes: int = MAX_REQUEST_BYTES,
):
    """The Serve application: a gateway in front of ``num_replicas`` adapter replicas."""
    AdapterStore(root)  # fail now on a missing folder, not inside a replica
    replica = serve.deployment(
        AdapterReplica,
        name="AdapterReplica",
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    )
    gateway = Gateway.options(ray_actor_options={"num_cpus": 0.1})
    return gateway.bind(replica.bind(root, backend_kwargs), root, max_request_bytes)


def build_app(args: dict[str, Any]):
    """``serve run serve/adapted.yaml``: ``args`` are :func:`build_adapters_app`'s."""
    args = dict(args)
    return build_adapters_app(args.pop("root"), **args)


def serve_adapters(
    root: str,
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
    from vlmlab.distributed import ensure_ray

    ensure_ray(address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_adapters_app(root, **options), name=APP_NAME, route_prefix="/")
    try:  # the proxy that actually runs (an earlier serve.start may have chosen another port)
        config = serve.context._global_client.http_config
        host, port = config.host, config.port
    except AttributeError:  # a Ray without that attribute: report what was asked for
        pass
    return f"http://{host}:{port}"
