"""The oracle service's wire format: request fields read and checked, responses rendered.

Wire format of arrays: a nested JSON list, or ``{"shape": [...],
"float32_base64": "..."}`` (little-endian float32), which is exact and ~4x
smaller. A response uses the request's form.

Apart from :mod:`vlmlab.serving._oracle_service` (keys, budgets, image sets,
metered calls): these are pure functions of a request's fields and of arrays,
with no state and no Ray; :class:`~vlmlab.serving.HttpOracle` uses the same
:func:`encode_array` and :func:`decode_array` on the client's side.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlmlab.oracle import validate_indices
from vlmlab.serving._classifier import RequestError

MAX_ARRAY_DIM = 2**20
"""Largest extent of one axis of a base64 array (a shape's product is checked exactly);
far above any real axis (candidates, tokens, token dimension)."""
MAX_CONTEXT_ABS = 65504.0
"""Largest magnitude of a context value: fp16's largest finite number. Finite float32
values beyond it (3e38) overflow the text tower's arithmetic into NaN logits, and the
official code rounds contexts to fp16 anyway; refused before any query is charged."""


def encode_array(array: np.ndarray, binary: bool) -> Any:
    if binary:
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        return {"shape": list(array.shape), "float32_base64": base64.b64encode(data).decode()}
    return array.tolist()


def _nested_json(array: np.ndarray) -> str:
    """``json.dumps(array.tolist())``, a block of a few thousand values at a time.

    Each block is one short call, so a thread rendering a big response lets the
    gateway's event loop run between blocks instead of holding it for seconds.
    """
    if array.ndim <= 1 or array.size <= 4096:
        return json.dumps(array.tolist(), separators=(",", ":"))
    return "[" + ",".join(_nested_json(part) for part in array) + "]"


@dataclass
class Answer:
    """A response with one array in it, rendered to JSON bytes off the event loop."""

    fields: dict[str, Any]
    name: str
    array: np.ndarray
    binary: bool

    def render(self) -> bytes:
        if self.binary:
            value = json.dumps(encode_array(self.array, True), separators=(",", ":"))
        else:
            value = _nested_json(self.array)
        rest = json.dumps(self.fields, separators=(",", ":"))
        return (f'{{"{self.name}":{value}' + ("," + rest[1:] if self.fields else "}")).encode()


def decode_array(value: Any, name: str) -> tuple[np.ndarray, bool]:
    """A float32 array from either wire form, and whether it came in binary form."""
    if isinstance(value, dict):
        shape, data = value.get("shape"), value.get("float32_base64")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_ARRAY_DIM
            for s in shape
        ):
            raise RequestError(
                422, f"{name}.shape must be a list of integers in [0, {MAX_ARRAY_DIM}]"
            )
        if len(shape) > 8:
            raise RequestError(422, f"{name}.shape has {len(shape)} axes; at most 8")
        if not isinstance(data, str):
            raise RequestError(422, f"{name}.float32_base64 must be a base64 string")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"{name}.float32_base64 is not valid base64") from None
        if len(raw) != 4 * math.prod(shape):  # exact integers: a product cannot overflow
            raise RequestError(
                422, f"{name}: {len(raw)} bytes do not hold float32 of shape {shape}"
            )
        try:
            return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32), True
        except (ValueError, OverflowError):  # e.g. a zero axis beside a vast one
            raise RequestError(
                422, f"{name}.shape {shape} cannot be used: its axes are too long together"
            ) from None
    if not isinstance(value, list):
        raise RequestError(
            422, f"{name} must be a nested list of numbers or {{shape, float32_base64}}"
        )
    _only_numbers(value, name)
    try:
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused by the caller
            array = np.asarray(value, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise RequestError(
            422, f"{name} must be a rectangular nested list of numbers (ragged or too large)"
        ) from None
    return array, False


def _only_numbers(value: list[Any], name: str) -> None:
    """Every leaf a JSON number: numpy would read ``"0.5"``, ``" 1 "`` or ``true`` as numbers.

    Iterative (the body's depth is bounded, its size is not small), and by exact
    type: ``bool`` is a subclass of ``int``.
    """
    stack: list[list[Any]] = [value]
    while stack:
        for item in stack.pop():
            kind = type(item)
            if kind is list:
                stack.append(item)
            elif kind is not float and kind is not int:
                shown = truncate_repr(item)
                raise RequestError(
                    422, f"{name} must hold numbers only; found {shown} ({kind.__name__})"
                )


def truncate_repr(item: Any, limit: int = 40) -> str:
    text = repr(item)
    return text if len(text) <= limit else text[:limit] + "..."


def check_context_range(contexts: np.ndarray, name: str = "contexts") -> None:
    """Refuse values fp16 cannot hold (:data:`MAX_CONTEXT_ABS`); NaN and inf are the oracle's."""
    with np.errstate(invalid="ignore"):
        big = np.isfinite(contexts) & (np.abs(contexts) > MAX_CONTEXT_ABS)  # NaN/inf: the oracle's
    if big.any():
        raise RequestError(
            422,
            f"{name} holds {int(big.sum())} values beyond +-{MAX_CONTEXT_ABS:g} (fp16's range); "
            "they overflow the text tower into NaN logits",
        )


def _binary(fields: dict[str, Any]) -> bool:
    """The optional ``binary`` field: a JSON boolean, nothing that merely looks like one."""
    binary = fields.get("binary", False)
    if not isinstance(binary, bool):
        raise RequestError(422, "binary must be true or false")
    return binary


def _shown(text: str, most: int = 80) -> str:
    """A client's string, quoted, cut short: an error never echoes a whole body back."""
    return repr(text if len(text) <= most else text[:most] + "...")


def _indices(value: Any, size: int) -> np.ndarray | None:
    """The ``indices`` field as int64, checked in plain Python before numpy sees it."""
    if not isinstance(value, list) or not value:  # null too: leave the field out for all
        raise RequestError(422, "indices must be a non-empty list of integers")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise RequestError(422, "indices must be integers", kind="TypeError")
    low, high = min(value), max(value)
    if low < 0 or high >= size:
        raise RequestError(
            422, f"indices out of range for an image set of {size} images: min {low}, max {high}"
        )
    index = validate_indices(np.asarray(value, dtype=np.int64), size)
    return None if index is None else index.numpy()


class _Metadata:
    """Just what :func:`validate_contexts` reads, from a replica's ``describe``."""

    def __init__(self, token_dim: int, display_name: str) -> None:
        self.token_dim = token_dim
        self.display_name = display_name

    @classmethod
    def of(cls, described: dict[str, Any]) -> Any:
        return cls(described["token_dim"], f"{described['backend']} {described['model']}")
