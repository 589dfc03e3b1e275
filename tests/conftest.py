"""Shared fixtures: models are built once per test run (they cost seconds each)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One console width for every test run: rich lays tables out to the terminal, and
# the tests read the CLI's tables whether pytest runs in a narrow pane or in CI.
os.environ["COLUMNS"] = "160"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A feature cache private to this test run, so no test depends on old entries."""
    return str(tmp_path_factory.mktemp("vlmlab-cache"))


@pytest.fixture(scope="session")
def clip_factory(cache_dir: str):
    """Random-init open_clip oracles by architecture, built once each."""
    from vlmlab.oracle._open_clip import OpenClipOracle

    built: dict[tuple[str, bool], OpenClipOracle] = {}

    def get(arch: str, *, prefix_sharing: bool = True) -> OpenClipOracle:
        key = (arch, prefix_sharing)
        if key not in built:
            built[key] = OpenClipOracle(arch, cache_dir=cache_dir, prefix_sharing=prefix_sharing)
        return built[key]

    return get


@pytest.fixture(scope="session")
def vit_b32(clip_factory):
    return clip_factory("ViT-B-32")


@pytest.fixture(scope="session")
def conse(cache_dir: str):
    from vlmlab.oracle import create_oracle

    return create_oracle("conse", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def fashion_test():
    from vlmlab.data import load_dataset

    return load_dataset("fashion-mnist", "test")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test run (starting Ray costs 5-20 s here)."""
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from vlmlab.front import (
        MAX_UNREAD_BYTES_ENV,
        PROXY_CALLBACK,
        PROXY_CALLBACK_ENV,
        UNREAD_TIMEOUT_ENV,
    )

    # Serve's proxy in this Ray gets the front door's bounds, as `vlmlab serve`'s does.
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    # Small enough for the tests to reach with a few responses (defaults: 64 MiB, 30 s).
    os.environ.setdefault(MAX_UNREAD_BYTES_ENV, str(4 * 1024 * 1024))
    os.environ.setdefault(UNREAD_TIMEOUT_ENV, "20")
    import ray

    from vlmlab.pool import ensure_ray

    ensure_ray(num_cpus=4)
    from ray import serve

    from vlmlab.serving import proxy_http_options

    # One Serve per cluster, with its HTTP proxy on a free loopback port (and the idle
    # timeout `vlmlab serve` sets): the serving tests reach it over real HTTP; pools
    # started later reuse this Serve as it is.
    serve.start(http_options=proxy_http_options("127.0.0.1", _free_port()))
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def conse_pool(ray_session, cache_dir):
    """The ConSE oracle pool: two replicas sharing the session's feature cache."""
    from vlmlab.pool import deploy_oracle_pool

    return deploy_oracle_pool(
        "conse",
        backend_kwargs={"cache_dir": cache_dir},
        num_replicas=2,
        num_cpus=0.5,
        app_name="test-pool",
    )


@pytest.fixture(scope="session")
def fashion_train():
    from vlmlab.data import load_dataset

    return load_dataset("fashion-mnist", "train")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on loopback for the whole run."""
    from vlmlab.testing import LoopbackS3

    with LoopbackS3() as server:
        yield server


def _bucket_name(request) -> str:
    """A bucket name from the test's name, valid on S3 and GCS."""
    import re

    return re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")


@pytest.fixture
def s3_results(s3_server, request) -> str:
    """A fresh bucket for one test; returns its ``s3://`` URI (endpoint and keys in it)."""
    return s3_server.create_bucket(_bucket_name(request))


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS-compatible server (fake-gcs-server) on loopback for the whole run.

    Clients authenticate through Google's usual credential chain: while it runs,
    ``$GOOGLE_APPLICATION_CREDENTIALS`` names credentials whose token endpoint is
    on loopback too.
    """
    from vlmlab.testing import LoopbackGCS

    with LoopbackGCS() as server:
        yield server


@pytest.fixture(params=["s3", "gcs"])
def object_store(request):
    """Each loopback object store in turn: moto's S3, then fake-gcs-server."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def object_store_results(object_store, request) -> str:
    """A fresh bucket for one test on ``object_store``; returns its ``s3://`` or ``gs://`` URI."""
    return object_store.create_bucket(_bucket_name(request))


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback for the whole run (started on first use)."""
    from vlmlab.testing import LoopbackPostgres

    with LoopbackPostgres() as server:
        yield server


@pytest.fixture
def postgres_ledger(postgres_server, request) -> str:
    """A fresh database for one test; returns its ``postgresql://`` URI."""
    import re

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:60]
    return postgres_server.create_database(name)
