"""The adapted-model HTTP app: real requests to a running Ray Serve app on loopback."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmlab.serving import AdaptedModel, AdapterStore

pytestmark = pytest.mark.slow


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def url(ray_session, adapters, cache_dir):
    from ray import serve

    from vlmlab.serving._http import APP_NAME, serve_adapters

    base = serve_adapters(
        str(adapters),
        backend_kwargs={"cache_dir": cache_dir},
        num_cpus=0.5,
        max_request_bytes=200_000,
    )
    yield base
    serve.delete(APP_NAME)


@pytest.fixture(scope="module")
def image(fashion_test):
    index = int(np.flatnonzero(fashion_test.labels == 1)[0])  # trousers: a forgotten class
    return fashion_test.images[index]


def _classify(url, adapter, png, top_k=10):
    body = {"adapter": adapter, "image": base64.b64encode(png).decode(), "top_k": top_k}
    return requests.post(f"{url}/v1/classify", json=body, timeout=120)


def test_health_and_adapter_list(url):
    health = requests.get(f"{url}/healthz", timeout=30).json()
    assert health == {"status": "ok", "adapters": 3, "oracle": False}
    listed = {a["id"]: a for a in requests.get(f"{url}/v1/adapters", timeout=30).json()["adapters"]}
    assert set(listed) == {"forget-bbf-s1", "craft-craft-k2-s1", "dev-constrained-s1"}
    assert listed["forget-bbf-s1"]["forget"] == [0, 1, 2, 3]
    assert listed["dev-constrained-s1"]["kind"] == "devsafety"
    assert all(a["backend"] == "ConSE" for a in listed.values())  # never presented as CLIP


def test_three_adapters_multiplexed_match_in_process(url, adapters, conse, image):
    png = _png(image)
    store = AdapterStore(adapters)
    for adapter in ("forget-bbf-s1", "craft-craft-k2-s1", "dev-constrained-s1"):
        response = _classify(url, adapter, png)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["adapter"] == adapter and body["backend"] == "ConSE"
        expected = AdaptedModel.load(store, adapter, conse).classify(image, top_k=10)
        got = body["predictions"]
        assert [p["class_index"] for p in got] == [p["class_index"] for p in expected]
        assert np.allclose(
            [p["probability"] for p in got], [p["probability"] for p in expected], atol=1e-5
        )
        assert sum(p["probability"] for p in got) == pytest.approx(1.0, abs=1e-4)


def test_multipart_upload_and_top_k(url, image):
    response = requests.post(
        f"{url}/v1/classify",
        files={"image": ("trousers.png", _png(image), "image/png")},
        data={"adapter": "dev-constrained-s1", "top_k": "3"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3


def test_forgotten_classes_are_flagged(url, image):
    # An image of a forgotten class gets the adapted model's ranking as it is; every
    # prediction of a forgotten class carries forgotten: true, the others false.
    predictions = _classify(url, "forget-bbf-s1", _png(image)).json()["predictions"]
    assert {p["class_index"] for p in predictions if p["forgotten"]} == {0, 1, 2, 3}
    other = _classify(url, "dev-constrained-s1", _png(image)).json()["predictions"]
    assert not any(p["forgotten"] for p in other)  # only forgetting adapters forget


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


MALFORMED = [
    ({"json": {"adapter": "dev-constrained-s1"}}, 422, "missing field(s): image"),
    ({"json": {"image": "aGVsbG8="}}, 422, "missing field(s): adapter"),
    ({"json": {}}, 422, "missing field(s): adapter, image"),
    ({"json": [1, 2]}, 422, "must be an object"),
    ({"json": "text"}, 422, "must be an object"),
    (
        {"data": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    ({"data": b"hello", "headers": {"content-type": "text/plain"}}, 415, "send application/json"),
    ({"data": b"hello"}, 415, "send application/json"),
    (
        {"json": {"adapter": "../forget-bbf-s1", "image": "aGVsbG8="}},
        400,
        "adapter ids are folder names",
    ),
    (
        {"json": {"adapter": "/etc/passwd", "image": "aGVsbG8="}},
        400,
        "adapter ids are folder names",
    ),
    ({"json": {"adapter": "nope", "image": "aGVsbG8="}}, 404, "no adapter 'nope'"),
    ({"json": {"adapter": 7, "image": "aGVsbG8="}}, 422, "adapter must be a string"),
    (
        {"json": {"adapter": "dev-constrained-s1", "image": 12}},
        422,
        "image must be a base64 string",
    ),
    ({"json": {"adapter": "dev-constrained-s1", "image": "%%%"}}, 422, "not valid base64"),
    (
        {"json": {"adapter": "dev-constrained-s1", "image": "aGVsbG8="}},
        415,
        "cannot decode the image",
    ),
    (
        {"json": {"adapter": "dev-constrained-s1", "image": "", "top_k": 1}},
        400,
        "the image is empty",
    ),
    (
        {"json": {"adapter": "dev-constrained-s1", "image": "aGVsbG8=", "top_k": 0}},
        422,
        "top_k must be",
    ),
    (
        {"json": {"adapter": "dev-constrained-s1", "image": "aGVsbG8=", "top_k": "many"}},
        422,
        "top_k must be",
    ),
    (
        {"json": {"adapter": "dev-constrained-s1", "image": "aGVsbG8=", "top_k": True}},
        422,
        "top_k must be",
    ),
    ({"json": {"adapter": "dev-constrained-s1", "image": "A" * 300_000}}, 413, "over 200000 bytes"),
    (
        {"files": {"image": ("x.png", b"garbage")}, "data": {"adapter": "dev-constrained-s1"}},
        415,
        "cannot decode",
    ),
    (
        {"files": {"other": ("x.png", b"garbage")}, "data": {"adapter": "dev-constrained-s1"}},
        422,
        "missing field(s): image",
    ),
    (
        {
            "data": {"adapter": "dev-constrained-s1", "image": "not a file"},
            "files": {"x": ("a", b"b")},
        },
        422,
        "image must be a file part",
    ),
]


@pytest.mark.parametrize(
    ("request_kwargs", "status", "message"), MALFORMED, ids=[m for _, _, m in MALFORMED]
)
def test_malformed_requests_get_4xx_json(url, request_kwargs, status, message):
    response = requests.post(f"{url}/v1/classify", timeout=60, **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_wrong_method_and_path_are_4xx(url):
    assert requests.get(f"{url}/v1/classify", timeout=30).status_code == 405
    assert requests.get(f"{url}/v1/nothing", timeout=30).status_code == 404


def test_openapi_documents_the_endpoints(url):
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/v1/classify", "/v1/adapters", "/healthz"} <= set(spec["paths"])
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
BODIES = st.fixed_dictionaries(
    {},
    optional={
        "adapter": st.sampled_from(["dev-constrained-s1", "forget-bbf-s1", "..", "x/y"])
        | JSON_VALUES,
        "image": st.sampled_from(["", "aGVsbG8=", "!!"])
        | st.binary(max_size=64).map(_b64)
        | JSON_VALUES,
        "top_k": st.integers(-5, 2000) | JSON_VALUES,
    },
)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    body=BODIES | JSON_VALUES,
    raw=st.binary(max_size=256),
    content_type=st.sampled_from(
        ["application/json", "multipart/form-data; boundary=xyz", "text/plain", "", "image/png"]
    ),
)
def test_fuzzed_requests_never_get_a_5xx(url, body, raw, content_type):
    response = requests.post(f"{url}/v1/classify", json=body, timeout=60)
    assert response.status_code < 500, (body, response.text)
    response = requests.post(
        f"{url}/v1/classify", data=raw, headers={"content-type": content_type}, timeout=60
    )
    assert response.status_code < 500, (raw, content_type, response.text)
    assert json.loads(response.text)  # always a JSON error body
