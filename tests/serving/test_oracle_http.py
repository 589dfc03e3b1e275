"""The black box as an HTTP service: real requests to a running Serve app on loopback.

API keys, per-key budgets (exactly B queries served), rate limits, per-key
image sets, malformed requests, a fuzz pass, and the ``HttpOracle`` client
through the Oracle conformance suite and a whole forgetting run.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json

import numpy as np
import pytest
import requests
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmlab.errors import BudgetExceededError
from vlmlab.oracle import ImageSet
from vlmlab.serving import HttpOracle, add_key
from vlmlab.testing import OracleConformance, random_contexts

pytestmark = pytest.mark.slow

NAMES = ["t-shirt", "trousers", "sneaker"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    tokens = {
        "alice": add_key(path, "alice", budget=20),
        "bob": add_key(path, "bob"),
        "slow": add_key(path, "slow", rate=0.2, burst=2),
        "small": add_key(path, "small", max_images=6),
    }
    return path, tokens


def _deploy(adapters, cache_dir, keys) -> str:
    from vlmlab.serving._http import serve_adapters

    return serve_adapters(
        str(adapters),
        keys=str(keys[0]),
        backend_kwargs={"cache_dir": cache_dir},
        num_cpus=0.25,
        oracle_cpus=0.5,
        oracle_torch_threads=torch.get_num_threads(),  # logits equal the local ones bit for bit
        max_request_bytes=1_000_000,
    )


@pytest.fixture(scope="module")
def url(ray_session, adapters, cache_dir, keys):
    from ray import serve

    from vlmlab.serving._http import APP_NAME

    yield _deploy(adapters, cache_dir, keys)
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def images(fashion_test):
    return ImageSet(fashion_test.images[:6], {"dataset": "fashion-mnist", "split": "test"})


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _register(url, token, pixels) -> str:
    body = {"images": [_png_b64(p) for p in pixels]}
    response = requests.post(f"{url}/v1/oracle/image-sets", json=body, headers=_auth(token))
    assert response.status_code == 200, response.text
    return response.json()["image_set"]


# ------------------------------------------------------------- the client
@pytest.fixture(scope="module")
def bob(url, keys):
    return HttpOracle(url, keys[1]["bob"])


class TestHttpOracleConformance(OracleConformance):
    @pytest.fixture
    def oracle(self, bob):
        return bob

    @pytest.fixture
    def image_set(self, bob, images):
        return bob.register_images(images)


def test_logits_equal_the_local_backend_bit_for_bit(url, keys, conse, images):
    remote = HttpOracle(url, keys[1]["bob"])
    assert remote.metadata.backend == "ConSE"  # never presented as CLIP
    assert torch.equal(remote.metadata.embedding_mean, conse.metadata.embedding_mean)
    ref = remote.register_images(images)
    assert ref == conse.register_images(images)
    contexts = random_contexts(conse, 5, seed=11)
    assert torch.equal(
        remote.logits(contexts, NAMES, ref, indices=[5, 0, 2]),
        conse.logits(contexts, NAMES, ref, indices=[5, 0, 2]),
    )
    assert torch.equal(
        remote.phrase_embeddings("a photo of a"), conse.phrase_embeddings("a photo of a")
    )


def test_a_forgetting_run_over_http_equals_the_in_process_run(url, keys, conse, tmp_path):
    from vlmlab.runner import run_experiment
    from vlmlab.specs import validate_spec

    tree = {
        "name": "http",
        "backend": {"name": "conse"},
        "seeds": [3],
        "eval_every": 1,
        "data": {"dataset": "fashion-mnist", "shots": 2, "test_size": 40, "forget": [0, 1]},
        "method": {"name": "bbf", "popsize": 6, "iterations": 2, "batch_size": 10},
    }
    remote = HttpOracle(url, keys[1]["bob"])
    before = remote.usage()["queries_used"]
    (over_http,) = run_experiment(validate_spec(tree, "http"), tmp_path / "http", oracle=remote)
    (local,) = run_experiment(validate_spec(tree, "local"), tmp_path / "local", oracle=conse)
    assert over_http.test == local.test and over_http.queries_used == local.queries_used
    # The server counted every query the run sent: optimization and evaluation alike.
    charged = remote.ledger.keys()
    sent = sum(remote.ledger.usage(key).queries for key in charged)
    assert remote.usage()["queries_used"] - before == sent > over_http.queries_used > 0


# ------------------------------------------------------------ keys and budgets
def test_health_lists_both_services(url):
    assert requests.get(f"{url}/healthz", timeout=30).json() == {
        "status": "ok",
        "adapters": 3,
        "oracle": True,
    }


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer vlm_not-a-key"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"X-API-Key": "vlm_whatever"},
    ],
    ids=["none", "empty", "no token", "unknown", "basic", "other header"],
)
def test_requests_without_a_valid_key_are_401(url, keys, headers):
    for method, path in [
        ("GET", "/v1/oracle/metadata"),
        ("GET", "/v1/oracle/usage"),
        ("POST", "/v1/oracle/logits"),
        ("POST", "/v1/oracle/image-sets"),
        ("POST", "/v1/oracle/phrase-embeddings"),
    ]:
        response = requests.request(method, url + path, headers=headers, json={}, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "API key" in response.json()["error"]


def test_a_key_with_budget_b_is_served_exactly_b_queries(url, keys, images):
    token = keys[1]["alice"]  # budget 20
    set_id = _register(url, token, images.pixels)
    contexts = random_contexts(HttpOracle(url, token), 3).tolist()

    def client() -> list[requests.Response]:
        """Sends calls of 3 queries until one is refused; returns every response."""
        responses = []
        while not responses or responses[-1].status_code == 200:
            responses.append(
                requests.post(
                    f"{url}/v1/oracle/logits",
                    json={"contexts": contexts, "class_names": NAMES, "image_set": set_id},
                    headers=_auth(token),
                    timeout=120,
                )
            )
        return responses

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = [r for rs in pool.map(lambda _: client(), range(4)) for r in rs]
    served = [r.json() for r in responses if r.status_code == 200]
    refusals = [r.json() for r in responses if r.status_code != 200]
    assert all(r.status_code in (200, 402) for r in responses), [r.text for r in responses]
    for body in served:
        assert np.asarray(body["logits"]).shape == (3, 6, 3) == tuple(body["shape"])
        # Reservations of calls still in flight are held too: used + left <= B.
        assert body["queries"] == 3 and body["queries_used"] + body["queries_left"] <= 20
    assert sorted(body["queries_used"] for body in served)[-1] == 18
    assert 3 * len(served) == 18 and len(refusals) == 4  # six calls of 3 fit in 20
    assert all(r["queries_left"] == 2 and r["budget"] == 20 for r in refusals)
    assert "needs 3 queries, 2 left of 20" in refusals[0]["error"]
    # The two queries left are served, then nothing more: exactly B = 20 in all.
    last = requests.post(
        f"{url}/v1/oracle/logits",
        json={"contexts": contexts[:2], "class_names": NAMES, "image_set": set_id},
        headers=_auth(token),
        timeout=120,
    )
    assert last.status_code == 200 and last.json()["queries_left"] == 0
    one = {"contexts": contexts[:1], "class_names": NAMES, "image_set": set_id}
    refused = requests.post(f"{url}/v1/oracle/logits", json=one, headers=_auth(token))
    assert refused.status_code == 402
    usage = requests.get(f"{url}/v1/oracle/usage", headers=_auth(token)).json()
    assert (usage["queries_used"], usage["queries_left"], usage["budget"]) == (20, 0, 20)
    with pytest.raises(BudgetExceededError, match="requested 1 queries, 0 left of 20"):
        client_oracle = HttpOracle(url, token)
        client_oracle.register_images(images)
        client_oracle.logits(torch.tensor(contexts[:1]), NAMES, set_id)


def test_a_reloaded_keys_file_keeps_spent_queries_with_the_name(url, keys, images):
    """Remove a key, add it again with a new token: it has spent what it had spent."""
    from vlmlab.serving import reload_keys

    path = keys[0]
    carol = add_key(path, "carol", budget=10)
    assert reload_keys(path)["added"] == ["carol"]
    set_id = _register(url, carol, images.pixels)
    contexts = random_contexts(HttpOracle(url, carol), 3).tolist()
    body = {"contexts": contexts, "class_names": NAMES, "image_set": set_id}
    assert requests.post(f"{url}/v1/oracle/logits", json=body, headers=_auth(carol)).ok

    tree = yaml.safe_load(path.read_text())
    record = tree["keys"].pop("carol")
    path.write_text(yaml.safe_dump(tree))
    assert reload_keys(path)["removed"] == ["carol"]
    refused = requests.get(f"{url}/v1/oracle/usage", headers=_auth(carol))
    assert refused.status_code == 401
    assert requests.get(f"{url}/v1/oracle/usage", headers=_auth(keys[1]["bob"])).ok

    again = add_key(path, "carol", budget=12)  # a new token for the same name
    assert again != carol and record["sha256"] not in path.read_text()
    assert reload_keys(path)["added"] == ["carol"]
    usage = requests.get(f"{url}/v1/oracle/usage", headers=_auth(again)).json()
    assert (usage["queries_used"], usage["budget"], usage["queries_left"]) == (3, 12, 9)
    assert requests.get(f"{url}/v1/oracle/usage", headers=_auth(carol)).status_code == 401


def test_rate_limit_answers_429_with_retry_after(url, keys):
    token = keys[1]["slow"]  # 0.2 requests a second, burst 2
    statuses = [
        requests.get(f"{url}/v1/oracle/usage", headers=_auth(token), timeout=30) for _ in range(3)
    ]
    assert [r.status_code for r in statuses[:2]] == [200, 200]
    assert statuses[2].status_code == 429 and int(statuses[2].headers["Retry-After"]) >= 1
    assert "rate limit of key 'slow'" in statuses[2].json()["error"]
    # Other keys are not slowed by it.
    bob = requests.get(f"{url}/v1/oracle/usage", headers=_auth(keys[1]["bob"]), timeout=30)
    assert bob.status_code == 200


def test_image_sets_are_private_to_their_key(url, keys, images):
    set_id = _register(url, keys[1]["bob"], images.pixels[:2])
    body = {"contexts": random_contexts(HttpOracle(url, keys[1]["bob"]), 1).tolist()}
    body |= {"class_names": NAMES, "image_set": set_id}
    response = requests.post(f"{url}/v1/oracle/logits", json=body, headers=_auth(keys[1]["small"]))
    assert response.status_code == 404 and "private to each key" in response.json()["error"]


def test_per_key_image_limit(url, keys, images):
    token = keys[1]["small"]  # may register 6 images in all
    _register(url, token, images.pixels[:4])
    _register(url, token, images.pixels[:4])  # the same set again is free
    body = {"images": [_png_b64(p) for p in images.pixels[3:6]]}
    response = requests.post(f"{url}/v1/oracle/image-sets", json=body, headers=_auth(token))
    assert response.status_code == 413
    assert "may register 6 images in all; 4 are registered" in response.json()["error"]
    files = [
        ("images", (f"{i}.png", base64.b64decode(_png_b64(p))))
        for i, p in enumerate(images.pixels[4:6])
    ]
    response = requests.post(f"{url}/v1/oracle/image-sets", files=files, headers=_auth(token))
    assert response.status_code == 200 and response.json()["size"] == 2  # multipart works too


# ------------------------------------------------------------ malformed input
def _zeros(count: int) -> str:
    return base64.b64encode(np.zeros(count, "<f4").tobytes()).decode()


def _malformed(dim: int, length: int, set_id: str) -> list[tuple[str, str, dict, int, str]]:
    ok = [[[0.0] * dim] * 2]
    base = {"contexts": ok, "class_names": NAMES, "image_set": set_id}
    return [
        ("logits", "json", {"class_names": NAMES}, 422, "missing field(s): contexts, image_set"),
        ("logits", "json", {**base, "image_set": "nope"}, 404, "image_set 'nope' is no image set"),
        ("logits", "json", {**base, "image_set": [1]}, 422, "image_set must be a string"),
        (
            "logits",
            "json",
            {**base, "contexts": [[[0.0] * (dim + 1)]]},
            422,
            f"dimension {dim + 1}",
        ),
        ("logits", "json", {**base, "contexts": [[1, 2], [3]]}, 422, "rectangular"),
        ("logits", "json", {**base, "contexts": "abc"}, 422, "nested list of numbers"),
        ("logits", "json", {**base, "contexts": [["a"]]}, 422, "numbers only"),
        ("logits", "json", {**base, "contexts": []}, 422, "must have shape (population"),
        (
            "logits",
            "json",
            {**base, "contexts": {"shape": [0, 1, dim], "float32_base64": ""}},
            422,
            "at least one candidate",
        ),
        (
            "logits",
            "json",
            {**base, "contexts": {"shape": [1, 1, dim], "float32_base64": "AAAA"}},
            422,
            "do not hold float32",
        ),
        (
            "logits",
            "json",
            {**base, "contexts": {"shape": "x", "float32_base64": ""}},
            422,
            "shape must be",
        ),
        (
            "logits",
            "json",
            {**base, "contexts": {"shape": [1], "float32_base64": "%%"}},
            422,
            "not valid base64",
        ),
        ("logits", "json", {**base, "class_names": []}, 422, "class_names is empty"),
        ("logits", "json", {**base, "class_names": "cat"}, 422, "sequence of strings"),
        ("logits", "json", {**base, "class_names": ["cat", 3]}, 422, "class_names[1]"),
        ("logits", "json", {**base, "indices": [0, 99]}, 422, "out of range"),
        ("logits", "json", {**base, "indices": [0.5]}, 422, "integers"),
        (
            "logits",
            "json",
            {
                **base,
                "contexts": {"shape": [1, length, dim], "float32_base64": _zeros(length * dim)},
            },
            422,
            f"context length {length}",
        ),
        ("logits", "raw", {"data": "[1,2]"}, 422, "must be an object"),
        ("logits", "raw", {"data": "{oops"}, 400, "not valid JSON"),
        ("logits", "text", {"data": "hi"}, 415, "send application/json"),
        ("image-sets", "json", {"images": []}, 422, "images is empty"),
        ("image-sets", "json", {"images": "abc"}, 422, "list of base64 strings"),
        ("image-sets", "json", {"images": ["%%%"]}, 422, "images[0] is not valid base64"),
        ("image-sets", "json", {"images": ["aGVsbG8="]}, 415, "images[0]: cannot decode the image"),
        (
            "image-sets",
            "json",
            {
                "images": [
                    _png_b64(np.zeros((4, 4, 3), np.uint8)),
                    _png_b64(np.zeros((5, 4, 3), np.uint8)),
                ]
            },
            422,
            "images[1] is 4x5 but images[0] is 4x4",
        ),
        ("phrase-embeddings", "json", {"phrase": 3}, 422, "phrase must be a string"),
        ("phrase-embeddings", "json", {"phrase": ""}, 422, "no tokens"),
    ]


def test_malformed_oracle_requests_get_4xx_and_cost_nothing(url, keys, images):
    token = keys[1]["bob"]
    set_id = _register(url, token, images.pixels)
    before = requests.get(f"{url}/v1/oracle/usage", headers=_auth(token)).json()["queries_used"]
    meta = HttpOracle(url, token).metadata
    cases = _malformed(meta.token_dim, meta.context_length, set_id)
    assert len(cases) >= 15
    for path, form, body, status, message in cases:
        if form == "json":
            kwargs = {"json": body}
        elif form == "raw":
            kwargs = {"data": body["data"], "headers": {"content-type": "application/json"}}
        else:
            kwargs = {"data": body["data"], "headers": {"content-type": "text/plain"}}
        kwargs["headers"] = {**kwargs.get("headers", {}), **_auth(token)}
        response = requests.post(f"{url}/v1/oracle/{path}", timeout=60, **kwargs)
        assert response.status_code == status, (path, message, response.text)
        assert message in response.json()["error"], (message, response.text)
    after = requests.get(f"{url}/v1/oracle/usage", headers=_auth(token)).json()["queries_used"]
    assert after == before


def test_oversized_requests_are_413(url, keys):
    body = {"images": ["A" * 1_200_000]}
    response = requests.post(
        f"{url}/v1/oracle/image-sets", json=body, headers=_auth(keys[1]["bob"])
    )
    assert response.status_code == 413 and "over 1000000 bytes" in response.json()["error"]


def test_openapi_documents_the_oracle(url):
    paths = set(requests.get(f"{url}/openapi.json", timeout=30).json()["paths"])
    assert {
        "/v1/oracle/logits",
        "/v1/oracle/image-sets",
        "/v1/oracle/metadata",
        "/v1/oracle/usage",
        "/v1/oracle/phrase-embeddings",
    } <= paths


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


VALID = "<valid>"  # replaced in the test by a well-formed value that needs the server's facts


@pytest.fixture(scope="module")
def fuzz_facts(url, keys, images):
    token = keys[1]["bob"]
    return {
        "set": _register(url, token, images.pixels),
        "dim": HttpOracle(url, token).metadata.token_dim,
    }


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "contexts": st.just(VALID) | JSON_VALUES,
            "class_names": st.lists(st.text(max_size=6), max_size=3) | JSON_VALUES,
            "image_set": st.just(VALID) | st.text(max_size=6) | JSON_VALUES,
            "indices": st.lists(st.integers(-3, 10), max_size=3) | JSON_VALUES,
            "images": st.lists(st.text(max_size=8), max_size=2) | JSON_VALUES,
            "phrase": JSON_VALUES,
            "binary": JSON_VALUES,
        },
    ),
    complete=st.booleans(),
    path=st.sampled_from(["logits", "logits", "image-sets", "phrase-embeddings"]),
)
def test_fuzzed_oracle_requests_never_get_a_5xx(url, keys, fuzz_facts, body, complete, path):
    if complete:  # past the missing-field check, into the deeper paths
        body = {"contexts": VALID, "class_names": ["a"], "image_set": VALID} | body
    valid = {"contexts": [[[0.5] * fuzz_facts["dim"]]], "image_set": fuzz_facts["set"]}
    body = {k: valid[k] if v == VALID and k in valid else v for k, v in body.items()}
    response = requests.post(
        f"{url}/v1/oracle/{path}",
        data=json.dumps(body),  # NaN and Infinity included: Python's JSON writes them
        headers={"content-type": "application/json", **_auth(keys[1]["bob"])},
        timeout=60,
    )
    assert response.status_code < 500, (path, body, response.text)


def test_a_restarted_server_keeps_budgets_and_gets_image_sets_again(
    url, keys, adapters, cache_dir, images
):
    """Redeploying forgets image sets (the client sends them again), never what keys spent."""
    from ray import serve

    from vlmlab.serving._http import APP_NAME

    remote = HttpOracle(url, keys[1]["bob"])
    ref = remote.register_images(images)
    contexts = random_contexts(remote, 2, seed=5)
    before = remote.logits(contexts, NAMES, ref)
    used = remote.usage()["queries_used"]
    serve.delete(APP_NAME)
    assert _deploy(adapters, cache_dir, keys) == url
    assert torch.equal(remote.logits(contexts, NAMES, ref), before)
    after = remote.usage()
    assert after["queries_used"] == used + 2 and after["images_registered"] == len(images)
