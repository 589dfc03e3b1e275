"""Lazy image sets: registered batch by batch, hashed without decoding, cached like arrays."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from vlmlab.oracle import ImageSet, PixelSource, create_oracle, pixel_batches


class CountingSource:
    """A lazy ``N x S x S x 3`` source over an array: counts the rows it hands out."""

    def __init__(self, pixels: np.ndarray, fingerprint: str | None = None) -> None:
        self._pixels, self._fingerprint = pixels, fingerprint
        self.decoded = 0
        self.largest_batch = 0

    @property
    def shape(self):
        return self._pixels.shape

    @property
    def dtype(self):
        return self._pixels.dtype

    def __len__(self):
        return len(self._pixels)

    def __getitem__(self, index):
        rows = self._pixels[index]
        n = 1 if rows.ndim == 3 else len(rows)
        self.decoded += n
        self.largest_batch = max(self.largest_batch, n)
        return rows.copy()

    def fingerprint(self):
        return self._fingerprint


def _noise(n=10, side=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _old_hash(pixels: np.ndarray) -> str:
    """The content hash as it always was: existing feature caches are keyed by it."""
    digest = hashlib.sha256()
    digest.update(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()[:32]


def _latency(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMLAB_CACHE_DIR", str(tmp_path / "cache"))
    return create_oracle("latency:0", disk_cache=True)


def test_array_sets_hash_as_before():
    pixels = _noise()
    assert ImageSet(pixels).content_hash == _old_hash(pixels)
    strided = _noise(6)[::2]  # not contiguous
    assert ImageSet(strided).content_hash == _old_hash(strided)
    assert ImageSet(pixels).materialized().pixels is pixels


def test_a_source_without_fingerprint_hashes_its_pixels_in_chunks(monkeypatch):
    from vlmlab.oracle import _protocol

    pixels = _noise(9)
    monkeypatch.setattr(_protocol, "HASH_CHUNK_BYTES", 2 * 12 * 12 * 3)  # two rows a chunk
    source = CountingSource(pixels)
    assert isinstance(source, PixelSource)
    lazy = ImageSet(source, {"dataset": "noise"})
    assert lazy.is_lazy and len(lazy) == 9
    assert lazy.content_hash == _old_hash(pixels)  # the array's hash, so its cache entries
    assert source.largest_batch == 2 and source.decoded == 9
    assert lazy.content_hash == _old_hash(pixels)
    assert source.decoded == 9  # hashed once
    whole = lazy.materialized()
    assert isinstance(whole.pixels, np.ndarray) and np.array_equal(whole.pixels, pixels)


def test_a_fingerprinted_source_is_hashed_without_decoding():
    source = CountingSource(_noise(), fingerprint="files:abc")
    lazy = ImageSet(source)
    assert lazy.content_hash != _old_hash(_noise())
    assert source.decoded == 0
    assert ImageSet(CountingSource(_noise(), "files:abc")).content_hash == lazy.content_hash
    assert ImageSet(CountingSource(_noise(), "files:abd")).content_hash != lazy.content_hash
    # Clients that ship pixels register the array: its hash is the pixels' own.
    assert lazy.materialized().content_hash == _old_hash(_noise())


def test_image_sets_check_lazy_sources():
    with pytest.raises(TypeError, match=r"numpy array or a vlmlab\.oracle\.PixelSource"):
        ImageSet([[1, 2, 3]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(CountingSource(_noise().astype(np.float32)))
    with pytest.raises(ValueError, match="no images"):
        ImageSet(CountingSource(_noise(0)))
    with pytest.raises(ValueError, match="batch_size"):
        next(pixel_batches(_noise(), 0))


def test_registration_pulls_batches_and_the_cache_skips_decoding(tmp_path, monkeypatch):
    pixels = _noise(600, side=4)
    oracle = _latency(tmp_path, monkeypatch)
    source = CountingSource(pixels, fingerprint="600 noise images")
    ref = oracle.register_images(ImageSet(source, {"dataset": "noise"}))
    assert source.decoded == 600 and source.largest_batch == 256  # the backend's batch
    lazy_features = oracle.image_features(ref)
    array_ref = oracle.register_images(ImageSet(pixels, {"dataset": "noise"}))
    assert array_ref.id != ref.id
    assert torch.equal(oracle.image_features(array_ref), lazy_features)  # same encoder output
    # Another process (a new oracle, the same cache) finds the features on disk.
    again = CountingSource(pixels, fingerprint="600 noise images")
    other = _latency(tmp_path, monkeypatch)
    assert other.register_images(ImageSet(again, {"dataset": "noise"})) == ref
    assert again.decoded == 0
    assert torch.equal(other.image_features(ref), lazy_features)


def test_open_clip_encodes_a_lazy_set_as_it_encodes_the_array(tmp_path):
    oracle = create_oracle("open_clip:vlmlab-tiny-fmnist", cache_dir=str(tmp_path))
    pixels = _noise(5, side=28)
    source = CountingSource(pixels)
    lazy = oracle.encode_images(source)
    assert source.decoded == 5
    assert torch.equal(lazy, oracle.encode_images(pixels))


def test_an_image_folder_registers_lazily_and_hits_the_cache(tmp_path, monkeypatch):
    from PIL import Image

    from vlmlab.data import _imagefolder, load_dataset

    monkeypatch.setenv("VLMLAB_DATA_DIR", str(tmp_path / "data"))
    for c, name in enumerate(("ant", "bee", "cow")):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (30 + i, 24), (50 * c, 10 * i, 90)).save(
                tmp_path / "photos" / name / f"{i}.jpg"
            )
    decodes = [0]
    crop = _imagefolder.square_crop

    def counted(image, size):
        decodes[0] += 1
        return crop(image, size)

    monkeypatch.setattr(_imagefolder, "square_crop", counted)
    test = load_dataset("imagefolder", "test", root=tmp_path / "photos", image_size=16)
    assert len(test) == 6 and decodes[0] == 0
    oracle = _latency(tmp_path, monkeypatch)
    ref = oracle.register_images(test.image_set())
    assert decodes[0] == 6  # encoded once, in batches
    features = oracle.image_features(ref)
    expected = oracle.encode_images(np.asarray(test.images))
    assert torch.equal(features, expected)
    decodes[0] = 0
    reloaded = load_dataset("imagefolder", "test", root=tmp_path / "photos", image_size=16)
    other = _latency(tmp_path, monkeypatch)
    assert other.register_images(reloaded.image_set()) == ref
    assert decodes[0] == 0  # the cache hit decodes nothing
    assert torch.equal(other.image_features(ref), features)
    # A changed file changes the set: its cached features are not reused.
    Image.new("RGB", (30, 24), (1, 2, 3)).save(tmp_path / "photos" / test.meta["files"][0])
    changed = load_dataset("imagefolder", "test", root=tmp_path / "photos", image_size=16)
    assert changed.image_set().content_hash != ref.id


def test_the_http_client_sends_a_lazy_set_as_pixels(monkeypatch):
    """The server hashes the pixels it receives: the client registers the array's id."""
    import base64
    import io

    from PIL import Image

    from vlmlab.serving import HttpOracle

    received = []

    def fake_request(self, method, path, **kwargs):
        if path == "/v1/oracle/metadata":
            return {"backend": "fake", "model": "m", "token_dim": 4, "context_length": 77,
                    "embedding_mean": [0.0] * 4, "embedding_std": 1.0}  # fmt: skip
        images = [
            np.asarray(Image.open(io.BytesIO(base64.b64decode(item))))
            for item in kwargs["json"]["images"]
        ]
        received.append(len(images))
        return {"image_set": ImageSet(np.stack(images)).content_hash}

    monkeypatch.setattr(HttpOracle, "_request", fake_request)
    client = HttpOracle("http://127.0.0.1:9", "key")
    pixels = _noise(4)
    ref = client.register_images(ImageSet(CountingSource(pixels, "a fingerprint")))
    assert ref.id == _old_hash(pixels) and ref.size == 4 and received == [4]
