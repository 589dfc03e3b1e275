"""API keys for the black-box oracle service: stored hashed, each with a budget and a rate.

A keys file is YAML that never holds a key, only its SHA-256 digest::

    keys:
      alice:
        sha256: 9f86d0...        # of the key `vlmlab keys add alice` printed once
        budget: 8000             # queries in total; null: no cap
        rate: 5                  # requests a second, sustained; null: no limit
        burst: 10                # requests allowed at once above the rate
        max_images: 10000        # images this key may register in all
        max_classes: 1000        # ... and the other per-key limits (KEY_LIMITS)

Every field but ``sha256`` has a default; :data:`KEY_LIMITS` describes the
limits on the work of one request, which the gateway checks before any work
(``README.md``, "Limits").

Keys are 256-bit random tokens, so a plain SHA-256 (no salt, no slow hash)
cannot be reversed by guessing; a request's token is hashed and looked up by
digest, so lookups take the same time whichever key is asked for.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from vlmlab._io import atomic_write_text

KEY_PREFIX = "vlm_"
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Matched with ``fullmatch`` (``$`` would let a trailing newline through)."""
BUDGET_PREFIX = "api:"
"""Ledger accounts of API keys are ``api:<name>``, apart from the runs' own keys."""
PROMPTS_PER_REQUEST = 1000
"""A logits call draws one rate-limit token per started 1,000 prompts (candidates x classes)."""

KEY_LIMITS: dict[str, str] = {
    "max_concurrent": "requests of the key in progress at once (429 beyond)",
    "max_classes": "class names in one logits call",
    "max_prompts": "candidates x classes in one logits call (the text encoder's work)",
    "max_logits": "candidates x images x classes in one logits call (the response)",
    "max_json_logits": "logits of a call answered as nested JSON lists (base64: max_logits)",
    "max_text_bytes": "UTF-8 bytes of one class name or phrase (checked before tokenizing)",
    "max_tokens": "tokens of one class name or phrase, by the model's tokenizer",
    "max_image_pixels": "pixels of one image (width x height, read from its header)",
    "max_image_side": "pixels of one image's longer side",
    "max_set_pixels": "pixels of one image set, all its images together",
    "max_images": "images the key may hold registered, all its sets together",
    "max_image_bytes": "decoded bytes (height x width x 3) the key may hold registered",
}
"""The per-key limits on work, each a field of :class:`ApiKey`; over one, 413 naming it."""


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and the field."""


class ApiKey(BaseModel):
    """One key's record: its digest and what it may spend."""

    model_config = ConfigDict(extra="forbid")

    sha256: str
    budget: int | None = Field(default=None, ge=0)
    rate: float | None = Field(default=None, gt=0)
    burst: int = Field(default=10, ge=1)
    max_images: int = Field(default=10_000, ge=1)
    max_concurrent: int = Field(default=4, ge=1)
    max_classes: int = Field(default=1_000, ge=1)
    max_prompts: int = Field(default=20_000, ge=1)
    max_logits: int = Field(default=4 * 1024 * 1024, ge=1)
    max_json_logits: int = Field(default=1024 * 1024, ge=1)
    max_text_bytes: int = Field(default=256, ge=1)
    max_tokens: int = Field(default=64, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_image_side: int = Field(default=8192, ge=1)
    max_set_pixels: int = Field(default=64 * 1024 * 1024, ge=1)
    max_image_bytes: int = Field(default=256 * 1024 * 1024, ge=1)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex digits (the SHA-256 of the key)")
        return value


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: 256 random bits, URL-safe, with a prefix that makes it greppable."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_keys(path: str | Path, *, allow_empty: bool = False) -> dict[str, ApiKey]:
    """Read and check a keys file; every problem is named with its key and field.

    Every way a file can be unusable (unreadable, not UTF-8, not YAML, a wrong
    schema, no keys) is a :class:`KeysFileError`, so a service reloading it can
    keep the keys it serves. A file with no keys is refused unless
    ``allow_empty``: an emptied file (a truncated save, a bad edit) would
    otherwise lock out every key and drop their image sets.
    """
    path = Path(path)
    if not path.is_file():
        raise KeysFileError(f"{path}: no such keys file (create one with `vlmlab keys add`)")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise KeysFileError(f"{path}: cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise KeysFileError(
            f"{path}: not UTF-8 text (byte {error.start}: {error.reason})"
        ) from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise KeysFileError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("keys", {}), dict):
        raise KeysFileError(f"{path}: expected a mapping `keys: {{name: {{sha256: ...}}}}`")
    unknown = sorted(set(tree) - {"keys"})
    if unknown:
        raise KeysFileError(f"{path}: unknown top-level field(s) {unknown}; allowed: keys")
    keys: dict[str, ApiKey] = {}
    problems: list[str] = []
    for name, record in (tree.get("keys") or {}).items():
        if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
            problems.append(f"keys.{name}: a key name is 1-64 letters, digits, '.', '_' or '-'")
            continue
        try:
            keys[name] = ApiKey.model_validate(record if record is not None else {})
        except ValidationError as error:
            for item in error.errors():
                field = ".".join(str(part) for part in item["loc"])
                problems.append(f"keys.{name}.{field}: {item['msg']}")
    digests = [key.sha256 for key in keys.values()]
    if len(set(digests)) != len(digests):
        problems.append("two keys share one sha256: each key must be distinct")
    if problems:
        raise KeysFileError(f"{path}:\n  " + "\n  ".join(problems))
    if not keys and not allow_empty:
        raise KeysFileError(
            f"{path}: holds no keys; serving none would refuse every client "
            "(add one with `vlmlab keys add`, or pass --allow-no-keys if that is meant)"
        )
    return keys


def add_key(
    path: str | Path,
    name: str,
    *,
    budget: int | None = None,
    rate: float | None = None,
    burst: int = 10,
    max_images: int = 10_000,
    **limits: int,
) -> str:
    """Create ``name`` in the keys file (created if missing) and return the key, once.

    ``limits``: any of :data:`KEY_LIMITS` (the others keep their defaults).
    Only the key's digest is written; the file is replaced atomically.
    """
    unknown = sorted(set(limits) - set(KEY_LIMITS))
    if unknown:
        raise KeysFileError(f"unknown limit(s) {unknown}; known: {', '.join(KEY_LIMITS)}")
    path = Path(path)
    keys = load_keys(path, allow_empty=True) if path.exists() else {}
    if not KEY_NAME.fullmatch(name):
        raise KeysFileError(f"key name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    if name in keys:
        raise KeysFileError(f"{path}: key {name!r} exists; remove it first to replace it")
    token = new_key()
    try:
        keys[name] = ApiKey(
            sha256=hash_key(token),
            budget=budget,
            rate=rate,
            burst=burst,
            max_images=max_images,
            **limits,
        )
    except ValidationError as error:
        item = error.errors()[0]
        raise KeysFileError(f"{item['loc'][0]}: {item['msg']}") from None
    # Only what differs from the defaults is written: a later release's defaults apply.
    tree = {"keys": {n: k.model_dump(exclude_defaults=True) for n, k in keys.items()}}
    header = "# vlmlab API keys: SHA-256 digests only; `vlmlab keys add` prints a key once.\n"
    # Mode 0600 on purpose, whatever the umask (results files follow it): the keys
    # file holds no key, but its digests, budgets and limits are the service's
    # access control, for its owner alone to read.
    atomic_write_text(path, header + yaml.safe_dump(tree, sort_keys=False), mode=0o600)
    return token


class KeyRing:
    """Authenticates bearer tokens against the loaded digests."""

    def __init__(self, keys: dict[str, ApiKey]) -> None:
        self.keys = keys
        self._by_digest = {key.sha256: name for name, key in keys.items()}

    def authenticate(self, token: str) -> str | None:
        """The key's name, or None for an unknown token."""
        return self._by_digest.get(hash_key(token))


class RateLimiter:
    """A token bucket per key: ``rate`` requests a second sustained, ``burst`` at once.

    ``clock`` is injectable so tests can step time instead of sleeping.
    """

    def __init__(self, keys: dict[str, ApiKey], clock: Callable[[], float] = time.monotonic):
        self._limits = {n: (k.rate, k.burst) for n, k in keys.items() if k.rate is not None}
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last time)
        self._lock = threading.Lock()

    def update(self, keys: dict[str, ApiKey]) -> None:
        """New rates (a reloaded keys file); a kept key keeps what its bucket holds."""
        with self._lock:
            self._limits = {n: (k.rate, k.burst) for n, k in keys.items() if k.rate is not None}
            self._buckets = {n: b for n, b in self._buckets.items() if n in self._limits}

    def acquire(self, name: str, cost: float = 1.0) -> float:
        """0.0 when ``cost`` tokens were taken; else the seconds until they will be there.

        A request costs one token; a logits call adds one per started
        :data:`PROMPTS_PER_REQUEST` prompts beyond its first, so the rate limit
        sees a call over 1,000 classes as the work it is.
        """
        limit = self._limits.get(name)
        if limit is None or cost <= 0:
            return 0.0
        rate, burst = limit
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(name, (float(burst), now))
            tokens = min(float(burst), tokens + (now - last) * rate)
            if tokens >= cost:
                self._buckets[name] = (tokens - cost, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (cost - tokens) / rate


class KeySlots:
    """Requests in progress per key, at most its ``max_concurrent``.

    A key's requests hold a slot from authentication until their response, the
    body's upload included: a key cannot hold more of the gateway than that, and
    idle or slow connections of one key never take another key's slots.
    """

    def __init__(self, keys: dict[str, ApiKey]) -> None:
        self._limits = {name: key.max_concurrent for name, key in keys.items()}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def update(self, keys: dict[str, ApiKey]) -> None:
        """New limits (a reloaded keys file); slots held now stay held until left."""
        with self._lock:
            self._limits = {name: key.max_concurrent for name, key in keys.items()}

    def enter(self, name: str) -> bool:
        """Take a slot of ``name``; False when all its slots are held."""
        with self._lock:
            held = self._held.get(name, 0)
            if held >= self._limits.get(name, 0):  # a key removed meanwhile has none
                return False
            self._held[name] = held + 1
            return True

    def leave(self, name: str) -> None:
        with self._lock:
            self._held[name] = max(0, self._held.get(name, 0) - 1)

    def held(self, name: str) -> int:
        with self._lock:
            return self._held.get(name, 0)


def retry_after_header(seconds: float) -> dict[str, Any]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
