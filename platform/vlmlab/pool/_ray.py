"""Starting or joining Ray: the embedded default is a local Ray started on demand."""

from __future__ import annotations

import os

NAMESPACE = "vlmlab"


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``$RAY_ADDRESS``), else start a local Ray.

    ``address="auto"`` joins the cluster `ray start` runs on this machine. With
    no address a new local Ray starts, never a stray cluster found on the
    machine. It starts no dashboard and is shut down when this process exits
    (Ray binds its services to this machine's own address; nothing leaves the
    machine). Calling again once Ray is up does nothing.

    Ray's own defaults stand: workers' output and tracebacks reach this
    terminal (``log_to_driver``), and Ray's memory monitor (its OOM killer) runs
    as Ray configures it; set ``RAY_memory_monitor_refresh_ms`` yourself to change it.

    A local Ray gets the front door's bounds in Serve's HTTP proxy
    (:data:`vlmlab.front.PROXY_CALLBACK`, unless the variable names another
    callback): the proxy inherits this process's environment when it starts.
    """
    import ray

    from vlmlab.front import PROXY_CALLBACK, PROXY_CALLBACK_ENV

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, namespace=NAMESPACE)
        return
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ray.init(
        address="local",
        num_cpus=num_cpus if num_cpus is not None else max(4, os.cpu_count() or 1),
        include_dashboard=False,
        namespace=NAMESPACE,
    )
