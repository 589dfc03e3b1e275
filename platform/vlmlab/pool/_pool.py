"""The oracle replica pool on Ray Serve: the deployment, and the functions that deploy it.

- :func:`oracle_deployment` wraps :class:`OracleReplica`
  (:mod:`vlmlab.pool._replica`, the code inside a replica) in a Serve
  deployment named ``OracleReplica``.
- :func:`deploy_oracle_pool` deploys from Python and returns a
  :class:`PoolOracle` (:mod:`vlmlab.pool._client`, the caller's side);
  :func:`build_app` is the application builder that ``serve run
  serve/oracle.yaml`` calls (``import_path: vlmlab.pool:build_app``).

The replica, the client and their helpers are re-exported here: this module
was their home before it was split, and code may still import them from it.
"""

from __future__ import annotations

from typing import Any

from vlmlab.pool._client import DEFAULT_APP, PoolOracle, replica_failure
from vlmlab.pool._ray import NAMESPACE, ensure_ray
from vlmlab.pool._replica import SERVED_FEATURE_BYTES, OracleReplica, batching_settings

DEPLOYMENT = "OracleReplica"


def oracle_deployment(
    *,
    num_replicas: int | str = 1,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int = 4,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
):
    from ray import serve

    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        # Workers' output reaches the driver (Ray's default): without this, every
        # generation's request would print an access-log line into the user's terminal.
        # Warnings and errors still do.
        "logging_config": {"enable_access_log": False},
    }
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = num_replicas
    return serve.deployment(name=DEPLOYMENT, **options)(OracleReplica)


def build_app(args: dict[str, Any]):
    """Application builder for Serve config files (``serve run serve/oracle.yaml``).

    ``args``: ``backend`` (default ``conse``), ``backend_kwargs``, ``torch_threads`` and
    ``batching`` (``{max_requests, wait_ms}``); replicas and resources come from the
    config file's ``deployments`` section (``max_ongoing_requests`` at least
    ``max_requests``, or batches cannot fill).
    """
    args = dict(args or {})
    backend = args.pop("backend", "conse")
    backend_kwargs = args.pop("backend_kwargs", None) or {}
    torch_threads = args.pop("torch_threads", None)
    batching = batching_settings(args.pop("batching", None))
    if args:
        raise ValueError(
            f"unknown oracle app arguments {sorted(args)}; "
            "known: backend, backend_kwargs, torch_threads, batching"
        )
    return oracle_deployment().bind(backend, backend_kwargs, torch_threads, batching)


def deploy_oracle_pool(
    backend: str = "conse",
    *,
    backend_kwargs: dict[str, Any] | None = None,
    num_replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    max_ongoing_requests: int = 4,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    app_name: str = DEFAULT_APP,
    address: str | None = None,
    shard_size: int = 64,
    torch_threads: int | None = None,
    batching: dict[str, Any] | None = None,
) -> PoolOracle:
    """Deploy (or update) the oracle pool as a Serve app and return a client for it.

    Args:
        backend: ``"conse"`` or ``"open_clip:<arch>"``; ``backend_kwargs`` go to it.
        num_replicas: fixed replica count (ignored when ``autoscaling`` is given,
            a Serve ``autoscaling_config`` such as ``{"min_replicas": 1, "max_replicas": 4}``).
        max_ongoing_requests: requests one replica works on at once.
        num_cpus, num_gpus: resources of each replica.
        address: Ray cluster to join (default: ``$RAY_ADDRESS`` or a local Ray).
        torch_threads: torch threads of each replica (default: its CPUs).
        batching: ``{"max_requests": n, "wait_ms": w}``: each replica computes up to
            n concurrent requests (several trials' populations) in one pass, a
            request waiting at most w ms for company; ``max_ongoing_requests``
            must be at least n. None: each request alone.
    """
    from ray import serve

    settings = batching_settings(batching)
    if settings is not None and max_ongoing_requests < settings["max_requests"]:
        raise ValueError(
            f"batching max_requests={settings['max_requests']} needs max_ongoing_requests >= "
            f"{settings['max_requests']} (got {max_ongoing_requests}): a replica batches only "
            "the requests it holds"
        )
    ensure_ray(address)
    serve.start(proxy_location="Disabled")
    app = oracle_deployment(
        num_replicas=num_replicas,
        autoscaling=autoscaling,
        max_ongoing_requests=max_ongoing_requests,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    ).bind(backend, backend_kwargs or {}, torch_threads, settings)
    serve.run(app, name=app_name, route_prefix=None)
    return PoolOracle(app_name, shard_size=shard_size)


__all__ = [
    "DEFAULT_APP",
    "DEPLOYMENT",
    "NAMESPACE",
    "SERVED_FEATURE_BYTES",
    "OracleReplica",
    "PoolOracle",
    "batching_settings",
    "build_app",
    "deploy_oracle_pool",
    "ensure_ray",
    "oracle_deployment",
    "replica_failure",
]
