"""API keys: stored hashed, checked field by field, rate-limited by a token bucket (no Ray)."""

from __future__ import annotations

import pytest
import yaml

from vlmlab.serving import KeysFileError, add_key, hash_key, load_keys
from vlmlab.serving._keys import KeyRing, RateLimiter


def test_add_key_stores_only_the_digest(tmp_path):
    path = tmp_path / "keys.yaml"
    alice = add_key(path, "alice", budget=100, rate=2.5, burst=3)
    bob = add_key(path, "bob")
    text = path.read_text()
    assert alice.startswith("vlm_") and len(alice) > 40 and alice != bob
    assert alice not in text and bob not in text
    assert hash_key(alice) in text
    keys = load_keys(path)
    assert keys["alice"].budget == 100 and keys["alice"].rate == 2.5 and keys["alice"].burst == 3
    assert keys["bob"].budget is None and keys["bob"].rate is None
    ring = KeyRing(keys)
    assert ring.authenticate(alice) == "alice" and ring.authenticate(bob) == "bob"
    assert ring.authenticate(alice + "x") is None and ring.authenticate("") is None
    with pytest.raises(KeysFileError, match="key 'alice' exists"):
        add_key(path, "alice")
    with pytest.raises(KeysFileError, match=r"key name '\.\./x'"):
        add_key(path, "../x")
    with pytest.raises(KeysFileError, match="budget"):
        add_key(path, "carol", budget=-1)
    assert set(load_keys(path)) == {"alice", "bob"}  # refused adds changed nothing


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"keys": {"a": {"sha256": "abc"}}}, "keys.a.sha256: .*64 lowercase hex"),
        ({"keys": {"a": {"sha256": "0" * 64, "budget": -5}}}, "keys.a.budget"),
        ({"keys": {"a": {"sha256": "0" * 64, "rate": 0}}}, "keys.a.rate"),
        ({"keys": {"a": {"sha256": "0" * 64, "limit": 3}}}, "keys.a.limit: Extra inputs"),
        ({"keys": {"a": {}}}, "keys.a.sha256: Field required"),
        ({"keys": {"bad name": {"sha256": "0" * 64}}}, "keys.bad name: a key name"),
        ({"keys": {"a": {"sha256": "1" * 64}, "b": {"sha256": "1" * 64}}}, "share one sha256"),
        ({"keys": ["a"]}, "expected a mapping"),
        ({"keys": {}, "budget": 3}, r"unknown top-level field\(s\) \['budget'\]"),
    ],
)
def test_malformed_keys_files_name_the_field(tmp_path, tree, message):
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(KeysFileError, match=message):
        load_keys(path)


def test_missing_and_unparsable_keys_files(tmp_path):
    with pytest.raises(KeysFileError, match="no such keys file"):
        load_keys(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys: [unclosed")
    with pytest.raises(KeysFileError, match="not valid YAML"):
        load_keys(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"keys:\n  alice: {sha256: \xff\xfe}\n", "not UTF-8 text"),
        (b"", "holds no keys"),
        (b"# every key removed\n", "holds no keys"),
        (b"keys: {}\n", "holds no keys"),
    ],
    ids=["invalid utf-8", "empty", "comment only", "no keys"],
)
def test_every_unusable_keys_file_is_a_keys_file_error(tmp_path, content, message):
    """A reloading service catches KeysFileError and keeps its keys: nothing else escapes."""
    path = tmp_path / "keys.yaml"
    path.write_bytes(content)
    with pytest.raises(KeysFileError, match=message):
        load_keys(path)


def test_no_keys_is_accepted_only_when_asked_for(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys: {}\n")
    assert load_keys(path, allow_empty=True) == {}
    add_key(path, "first")  # adding to an empty file is how a file starts
    assert set(load_keys(path)) == {"first"}


def test_key_names_match_whole(tmp_path):
    with pytest.raises(KeysFileError, match="key name"):
        add_key(tmp_path / "keys.yaml", "alice\n")


def test_token_bucket_allows_the_burst_then_the_rate(tmp_path):
    path = tmp_path / "keys.yaml"
    add_key(path, "slow", rate=2.0, burst=3)
    add_key(path, "free")
    now = [100.0]
    limiter = RateLimiter(load_keys(path), clock=lambda: now[0])
    assert [limiter.acquire("slow") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("slow")
    assert wait == pytest.approx(0.5)  # one token at 2 a second
    now[0] += 0.5
    assert limiter.acquire("slow") == 0.0
    assert limiter.acquire("slow") > 0
    now[0] += 10  # refills to the burst, not beyond
    assert [limiter.acquire("slow") for _ in range(4)][-1] > 0
    assert all(limiter.acquire("free") == 0.0 for _ in range(100))
