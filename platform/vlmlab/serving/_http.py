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

Where the parts live: this module composes the application (the deployments
and their options) and deploys it; it holds ``AdapterReplica``. The
``Gateway`` deployment is :mod:`vlmlab.serving._gateway`, its FastAPI app and
error responses :mod:`vlmlab.serving._http_api`. The names that code imported
from here before that split are still importable from here (``serve run
serve/adapted.yaml`` imports ``vlmlab.serving._http:build_app``).
"""

import os
from pathlib import Path
from typing import Any

from ray import serve

from vlmlab.front import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from vlmlab.serving._classifier import AdaptedModel, AdapterStore, decode_image
from vlmlab.serving._gateway import BIG_REQUEST_BYTES, MAX_TOP_K, Gateway
from vlmlab.serving._http_api import Json, api
from vlmlab.serving._keys import load_keys
from vlmlab.serving._limits import ServerLimits, proxy_http_options
from vlmlab.serving._registrar import ImageRegistrar

APP_NAME = "vlmlab-adapters"
MAX_REQUEST_BYTES = ServerLimits().max_request_bytes


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


__all__ = [
    "APP_NAME",
    "BIG_REQUEST_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_TOP_K",
    "AdapterReplica",
    "Gateway",
    "Json",
    "api",
    "build_adapters_app",
    "build_app",
    "reload_keys",
    "serve_adapters",
]
