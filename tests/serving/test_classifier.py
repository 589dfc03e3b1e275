"""Adapter ids, image decoding and the adapted classifier, without Ray or HTTP."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlmlab.serving import AdapterStore, RequestError, decode_image


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_image_gives_rgb_uint8():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    pixels = decode_image(_png(gray))
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert (pixels[..., 0] == gray).all()


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty"),
        (b"not an image at all", 415, "not an image format"),
        (_png(np.zeros((4, 4), np.uint8))[:30], 415, "cannot decode"),
    ],
)
def test_decode_image_errors(data, status, message):
    with pytest.raises(RequestError, match=message) as info:
        decode_image(data)
    assert info.value.status == status


def test_adapter_ids_never_leave_the_root(tmp_path):
    root = tmp_path / "adapters"
    (root / "good").mkdir(parents=True)
    (root / "good" / "manifest.json").write_text("{}")
    (root / "no-manifest").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "manifest.json").write_text("{}")
    store = AdapterStore(root)
    assert store.ids() == ["good"]
    assert store.folder("good") == (root / "good").resolve()
    for bad, status in [
        ("../outside", 400),
        ("..", 400),
        ("/etc", 400),
        ("good/../good", 400),
        ("", 400),
        ("no-manifest", 404),
        ("missing", 404),
        ("a" * 200, 400),
    ]:
        with pytest.raises(RequestError) as info:
            store.folder(bad)
        assert info.value.status == status, bad
    (root / "link").symlink_to(tmp_path / "outside")
    assert store.ids() == ["good"]
    with pytest.raises(RequestError) as info:
        store.folder("link")  # a symlink out of the root is not an adapter
    assert info.value.status == 404
    with pytest.raises(FileNotFoundError, match="adapter root is not a folder"):
        AdapterStore(tmp_path / "nope")


def test_serve_config_builds_the_app_with_its_args(tmp_path):
    import importlib
    from pathlib import Path

    import yaml

    from vlmlab.serving import add_key

    config = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "serve" / "adapted.yaml").read_text()
    )
    (app,) = config["applications"]
    module, _, attribute = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attribute)
    assert callable(builder) and set(app["args"]) >= {"root", "keys", "oracle"}
    add_key(tmp_path / "keys.yaml", "alice", budget=10)
    args = {**app["args"], "root": str(tmp_path), "keys": str(tmp_path / "keys.yaml")}
    assert builder(args) is not None  # every argument the file names is one the builder takes
    with pytest.raises(ValueError, match="nothing to serve"):
        builder({**args, "root": None, "keys": None})
