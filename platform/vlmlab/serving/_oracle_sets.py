"""Each API key's image sets: registered, counted against its quotas, deleted, released.

:class:`_ImageSets` is a part of :class:`~vlmlab.serving._oracle_service.OracleService`
(its base class): a key registers image sets (content-addressed, like the
Oracle protocol's ``register_images``; decoded in the ``ImageRegistrar``
deployment), may only score the sets it registered, and may delete them to
free its quota; every oracle replica then drops their features. Apart from the
service's access, budget and logits code because it owns its own state (one
:class:`_KeyState` a key) and talks to the registrar only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from vlmlab.oracle import scoped_image_set_id
from vlmlab.serving._classifier import RequestError
from vlmlab.serving._keys import ApiKey
from vlmlab.serving._remote_calls import answer_of
from vlmlab.serving._scheduler import FairScheduler

MAX_IMAGES_PER_SET = 4096

log = logging.getLogger(__name__)


@dataclass
class _KeyState:
    image_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: int = 0
    image_bytes: int = 0
    uploads: dict[str, str] = field(default_factory=dict)
    """Digest of an upload's bytes -> its set id: the same upload again is not decoded again."""
    registering: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by the key's registration in progress (one at a time: quotas stay exact)."""


class _ImageSets:
    """The image-set endpoints of :class:`OracleService`, which sets these attributes."""

    keys: dict[str, ApiKey]
    registrar: Any  # a handle to the ImageRegistrar deployment
    oracle: Any  # a handle to the OracleReplica deployment
    decoding: FairScheduler
    _state: dict[str, _KeyState]
    _background: set[asyncio.Future[None]]

    # ------------------------------------------------------------ image sets
    async def register(self, name: str, images: list[bytes]) -> dict[str, Any]:
        """Register a set: checked from the images' headers, decoded in the registrar.

        One registration of a key at a time, so its image and byte quotas are
        exact; keys take fair turns on the registrar (cost: the upload's bytes).
        """
        key, state = self.keys[name], self._state[name]
        if not images:
            raise RequestError(422, "images is empty: send at least one image")
        if len(images) > MAX_IMAGES_PER_SET:
            raise RequestError(413, f"at most {MAX_IMAGES_PER_SET} images a set")
        if self.registrar is None:
            raise RequestError(404, "this server registers no image sets")
        digest = hashlib.sha256()
        for data in images:
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        upload = digest.hexdigest()
        async with state.registering:
            known = state.uploads.get(upload)
            if known is not None and known in state.image_sets:  # sent before: not decoded again
                return {"image_set": known, "size": state.image_sets[known]["size"]}
            limits = {
                field: getattr(key, field)
                for field in (
                    "max_image_pixels",
                    "max_image_side",
                    "max_set_pixels",
                    "max_images",
                    "max_image_bytes",
                )
            }
            room = (key.max_images - state.images, key.max_image_bytes - state.image_bytes)
            async with self.decoding.turn(name, sum(len(data) for data in images)):
                box = await answer_of(
                    self.registrar.register.remote(name, images, limits, room),
                    "the image registrar failed; nothing was registered, retry",
                )
            if box["id"] not in state.image_sets:  # the same pixels again: registered once
                # scope: the replicas hold this key's features apart from every other key's
                state.image_sets[box["id"]] = {**box, "upload": upload, "scope": name}
                state.images += box["size"]
                state.image_bytes += box["bytes"]
            state.uploads[upload] = box["id"]
        return {"image_set": box["id"], "size": box["size"]}

    async def delete(self, name: str, set_id: str) -> dict[str, Any]:
        """Forget one of the key's sets: its images and bytes no longer count against it,
        and every oracle replica drops its features before the answer."""
        if not self._forget(name, set_id):
            raise RequestError(404, f"unknown image set {set_id!r} of this key", kind="KeyError")
        await self._evict([scoped_image_set_id(name, set_id)])
        return {"image_set": set_id, "deleted": True, "images_registered": self._state[name].images}

    def _forget(self, name: str, set_id: str) -> bool:
        state = self._state[name]
        box = state.image_sets.pop(set_id, None)
        if box is None:
            return False
        state.images -= box["size"]
        state.image_bytes -= box["bytes"]
        state.uploads = {u: s for u, s in state.uploads.items() if s != set_id}
        self._release(name, [set_id])
        return True

    def _release(self, name: str, set_ids: list[str] | None) -> None:
        """The registrar lets go of these sets' pixels (in the background)."""
        if self.registrar is None:
            return
        release = self.registrar.release.remote(name, set_ids)

        async def wait() -> None:
            try:
                await release
            except Exception as error:  # a registrar that restarted holds nothing anyway
                log.warning("the image registrar did not release %s's sets: %s", name, error)

        self._background.add(task := asyncio.ensure_future(wait()))
        task.add_done_callback(self._background.discard)

    async def _evict(self, scoped: list[str]) -> None:
        """Every oracle replica drops these sets' features (a control call, not the hot path)."""
        if scoped and self.oracle is not None:
            await self.oracle.broadcast("forget_image_sets", scoped).results_async()
