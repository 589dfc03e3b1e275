"""`serve run serve/oracle.yaml`: start, one query, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "serve" / "oracle.yaml"


def test_config_names_the_builder():
    config = yaml.safe_load(CONFIG.read_text())
    (app,) = config["applications"]
    module, _, attribute = app["import_path"].partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attribute))


def test_serve_run_starts_answers_and_shuts_down(ray_session, tmp_path, cache_dir, fashion_test):
    from ray import serve

    from vlmlab.pool import PoolOracle

    config = yaml.safe_load(CONFIG.read_text())
    app = config["applications"][0]
    app["name"] = "smoke-oracle"
    app["args"]["backend_kwargs"] = {"cache_dir": cache_dir}
    app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.5
    path = tmp_path / "oracle.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = Path(sys.executable).with_name("serve")
    address = ray_session.get_runtime_context().gcs_address
    process = subprocess.Popen(
        [str(serve_bin), "run", str(path), "--address", address],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = serve.status().applications.get("smoke-oracle")
            if status is not None and status.status == "RUNNING":
                break
            assert process.poll() is None, "serve run exited early"
            time.sleep(0.5)
        else:
            pytest.fail("the app did not reach RUNNING")
        oracle = PoolOracle("smoke-oracle")
        assert oracle.metadata.backend == "ConSE"
        images = oracle.register_images(fashion_test.subset(np.arange(4)).image_set())
        ctx = oracle.phrase_embeddings("a photo of a").unsqueeze(0)
        logits = oracle.logits(ctx, fashion_test.class_names, images, budget_key="smoke")
        assert logits.shape == (1, 4, 10)
        assert oracle.ledger.usage("smoke").queries == 1
    finally:
        # Ctrl-C would make `serve run` shut down all of Serve, this test run's other
        # apps included; so stop the CLI and shut its app down by name.
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        serve.delete("smoke-oracle")
    assert "smoke-oracle" not in serve.status().applications
