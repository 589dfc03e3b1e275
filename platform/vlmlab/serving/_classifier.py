"""Adapted models as image classifiers: artifacts in, class rankings out (no Ray here).

An artifact folder (``vlmlab run`` writes one per trial) becomes an
:class:`AdaptedModel` on the backend named in its spec: forgetting and CraFT
artifacts score images with their learned prompt (CraFT's refinement head on
top), devsafety artifacts with their adapted class embeddings. An
:class:`AdapterStore` lists the artifacts under one root folder and refuses
any id that is not a plain folder name inside it.

What a forgetting adapter answers: its purpose is that the model no longer
recognizes the forgotten classes, so an image of a forgotten class gets the
adapted model's ranking as it is (usually some other class, or a forgotten
class with low confidence). Nothing is hidden or rewritten: every prediction
of a forgotten class is flagged ``forgotten: true``, and the adapter's
forget set is listed by ``GET /v1/adapters``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlmlab.errors import LimitExceededError
from vlmlab.oracle import LocalOracle
from vlmlab.results import MANIFEST, load_artifact
from vlmlab.storage import Location, locate
from vlmlab.tasks import get_task, list_tasks

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Matched with ``fullmatch`` (``$`` would let a trailing newline through)."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""Default most pixels of one image (width x height)."""
MAX_IMAGE_SIDE = 8192
"""Default longest side of one image: a pixel cap alone lets 1 x 16M through."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""The formats decoded; Pillow's other plugins (dozens of rarely used parsers) are never tried."""


class RequestError(ValueError):
    """A client's mistake; ``status`` is the HTTP status it maps to."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "",
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        """The Python exception a client library should raise (``ValueError``, ``KeyError``)."""
        self.headers = headers or {}
        self.extra = extra or {}
        """Machine-readable facts added to the JSON body (a refused budget's numbers)."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in a replica, it reaches the gateway whole (Exception pickles ``args`` only).
        return (_request_error, (self.status, str(self), self.kind, self.headers, self.extra))


def _request_error(
    status: int, message: str, kind: str, headers: dict[str, str], extra: dict[str, Any]
) -> RequestError:
    return RequestError(status, message, kind=kind, headers=headers, extra=extra)


@contextmanager
def _opened(data: bytes, max_pixels: int) -> Iterator[Any]:
    """The image, opened (its header read, nothing decoded); any decoder error is a 4xx.

    Whatever Pillow raises on a client's bytes (OSError, SyntaxError, struct.error,
    IndexError, ... depending on the format's parser) is that image's fault: 415,
    or 413 when decoding it would take more memory than there is.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(400, "the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            yield image
    except RequestError:
        raise
    except UnidentifiedImageError:
        served = ", ".join(IMAGE_FORMATS)
        raise RequestError(
            415,
            f"cannot decode the image: not an image format served here ({served}), or cut short",
        ) from None
    except Image.DecompressionBombError as error:  # Pillow's own ceiling, before ours
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        pixels = int(claimed.group(1)) if claimed else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise over_limit(
            "max_image_pixels", pixels, max_pixels, "the pixels of the image"
        ) from None
    except MemoryError:
        raise RequestError(
            413, "the image is too large to decode in this server's memory"
        ) from None
    except Exception as error:  # any parser error: see the docstring
        raise RequestError(
            415, f"cannot decode the image (truncated or corrupt): {str(error)[:200]}"
        ) from None


def over_limit(limit: str, requested: int, allowed: int, what: str) -> RequestError:
    """A 413 naming the limit, with its numbers for clients (``type``: LimitExceededError)."""
    return limit_error(LimitExceededError(limit, requested, allowed, what))


def limit_error(error: LimitExceededError) -> RequestError:
    return RequestError(
        413,
        str(error),
        kind="LimitExceededError",
        extra={"limit": error.limit, "requested": error.requested, "allowed": error.allowed},
    )


def _check_size(image: Any, max_pixels: int, max_side: int) -> tuple[int, int]:
    width, height = image.size
    if width < 1 or height < 1:
        raise RequestError(415, f"the image is {width}x{height}: it has no pixels")
    if max(width, height) > max_side:
        what = f"the longer side of a {width}x{height} image"
        raise over_limit("max_image_side", max(width, height), max_side, what)
    if width * height > max_pixels:
        what = f"the pixels of a {width}x{height} image"
        raise over_limit("max_image_pixels", width * height, max_pixels, what)
    return width, height


def probe_image(
    data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int = MAX_IMAGE_SIDE
) -> tuple[int, int]:
    """``(width, height)`` from the image's header, within the limits; nothing is decoded.

    A server checks every image of a request this way before decoding any, so
    a few bytes that claim a huge image are refused for the cost of a header.
    """
    with _opened(data, max_pixels) as image:
        return _check_size(image, max_pixels, max_side)


def decode_image(
    data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, max_side: int = MAX_IMAGE_SIDE
) -> np.ndarray:
    """Any image file of :data:`IMAGE_FORMATS` -> uint8 ``H x W x 3`` (RGB); a 4xx otherwise.

    The size in the header is checked against ``max_pixels`` and ``max_side``
    before anything is decoded (413 naming the limit).
    """
    with _opened(data, max_pixels) as image:
        _check_size(image, max_pixels, max_side)
        image.load()
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class AdapterStore:
    """The artifact folders under ``root`` (a path or a URI); ids are folder names, never paths."""

    def __init__(self, root: str | Path | Location) -> None:
        self.location = locate(root)
        if not self.location.is_dir():
            raise FileNotFoundError(f"adapter root is not a folder: {str(self.location)!r}")
        self.root = self.location.native

    def ids(self) -> list[str]:
        if not self.location.is_local:  # an object store has no links to escape through
            return [
                entry.name
                for entry in self.location.entries(folders=True)
                if ADAPTER_ID.fullmatch(entry.name) and (entry / MANIFEST).is_file()
            ]
        root = self.location.local_path
        return sorted(
            p.name
            for p in root.iterdir()
            if ADAPTER_ID.fullmatch(p.name)
            and p.resolve().parent == root  # a link out of the root is not an adapter
            and (p / MANIFEST).is_file()
        )

    def folder(self, adapter_id: str) -> Path | str:
        """The folder of ``adapter_id``: 400 for a malformed id, 404 for an unknown one."""
        if not isinstance(adapter_id, str) or not ADAPTER_ID.fullmatch(adapter_id):
            raise RequestError(
                400, "adapter ids are folder names: letters, digits, '.', '_' or '-' (max 128)"
            )
        folder = self.location / adapter_id
        if self.location.is_local:
            resolved = Path(folder.path).resolve()
            if resolved.parent != self.location.local_path:
                raise RequestError(404, f"no adapter {adapter_id!r}; GET /v1/adapters lists them")
            folder = locate(resolved)
        if not (folder / MANIFEST).is_file():
            raise RequestError(404, f"no adapter {adapter_id!r}; GET /v1/adapters lists them")
        return folder.native

    def manifest(self, adapter_id: str) -> dict[str, Any]:
        """The adapter's manifest (a small JSON file; its tensors stay on disk)."""
        import json

        manifest: dict[str, Any] = json.loads(
            (locate(self.folder(adapter_id)) / MANIFEST).read_text()
        )
        return manifest

    def describe(self, adapter_id: str) -> dict[str, Any]:
        manifest = self.manifest(adapter_id)
        facts = {
            "id": adapter_id,
            "kind": manifest.get("kind"),
            "method": manifest.get("method"),
            "backend": manifest.get("backend"),
            "model": manifest.get("model"),
            "dataset": manifest.get("dataset"),
            "class_names": manifest.get("class_names"),
        }
        for key in ("forget", "target", "protected"):
            if key in manifest:
                facts[key] = manifest[key]
        return facts


@dataclass
class AdaptedModel:
    """One artifact, ready to classify images on its backend."""

    adapter_id: str
    manifest: dict[str, Any]
    oracle: LocalOracle
    class_embeddings: torch.Tensor
    """Unit-norm ``C x E`` classifier over the backend's image features."""
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Applied to the logits (CraFT's refinement head); None: the logits as they are."""

    @classmethod
    def load(cls, store: AdapterStore, adapter_id: str, oracle: LocalOracle) -> AdaptedModel:
        """The artifact's classifier, as its task (the manifest's ``kind``) builds it."""
        artifact = load_artifact(store.folder(adapter_id))
        kind = artifact.manifest.get("kind")
        if kind not in list_tasks():
            raise ValueError(f"adapter {adapter_id!r}: unknown artifact kind {kind!r}")
        embeddings, head = get_task(str(kind)).classifier(artifact, oracle)
        return cls(adapter_id, artifact.manifest, oracle, F.normalize(embeddings, dim=-1), head)

    def classify(self, pixels: np.ndarray, top_k: int = 5) -> list[dict[str, Any]]:
        """The top ``top_k`` classes of one image, with probabilities and flags."""
        names = self.manifest["class_names"]
        with torch.inference_mode():
            features = self.oracle.encode_images(pixels[None].copy())
            logits = features @ self.class_embeddings.T * self.oracle.logit_scale
            logits = logits + self.oracle.logit_bias
            if self.head is not None:
                logits = self.head(logits)
            probabilities = logits.softmax(-1)[0]
        forgotten = set(self.manifest.get("forget", []))
        top = probabilities.topk(min(top_k, len(names)))
        return [
            {
                "class_index": int(c),
                "label": names[int(c)],
                "probability": float(p),
                "forgotten": int(c) in forgotten,
            }
            for p, c in zip(top.values, top.indices, strict=True)
        ]
