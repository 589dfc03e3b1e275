"""Image sets are decoded in a process of their own, never in the gateway.

:class:`ImageRegistrar` is a Serve deployment of the HTTP app (``vlmlab serve
--keys``). The gateway sends it a key's encoded images; it checks every limit
from the images' headers, decodes them, hashes the set (its content address,
as ``Oracle.register_images`` does) and puts the pixels in Ray's object store,
from where the oracle replicas fetch them. So the gateway never holds decoded
pixels: its memory stays that of its requests, and a key registering the
biggest sets it may takes no CPU from the gateway's event loop. The registrar
runs at a lower CPU priority than the rest of the app (it is bulk work), on a
few threads; the gateway gives keys fair turns on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from typing import Any

import numpy as np

from vlmlab.oracle import ImageSet
from vlmlab.serving._classifier import RequestError, decode_image, over_limit, probe_image

BACKGROUND_NICENESS = 10
"""How much lower than the app's own the registrar's CPU priority is, where there
is no ``SCHED_IDLE``."""


def lower_thread_priority() -> None:
    """Make the calling thread background work: Linux's ``SCHED_IDLE``, else lower niceness.

    Linux keeps a scheduling policy and a niceness per thread, so each
    decoding thread lowers its own as it starts (``os.nice`` in the
    constructor would lower only the thread that ran it). Niceness alone is not
    enough: Ray already runs its workers at niceness 15, and under a ``nice``
    of 5 or more every replica sits at the cap of 19 with the registrar (a
    measured run: the decoding threads kept 0.63 of a core busy while the oracle
    replica got 0.66). ``SCHED_IDLE`` threads weigh less than any niceness yet still run
    (they are never starved outright), and an unprivileged process may choose it.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: the niceness is what there is
        with contextlib.suppress(AttributeError, OSError):
            os.nice(BACKGROUND_NICENESS)


class ImageRegistrar:
    """Checks, decodes, hashes and stores image sets; ``threads`` sets at once."""

    def __init__(self, threads: int = 2) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="decode", initializer=lower_thread_priority
        )
        # This process owns the pixels it puts. Ray's borrowing does not follow a ref
        # nested in a Serve response reliably: measured, a set first scored minutes
        # after it was registered found its pixels deleted (ReferenceCountingAssertionError).
        # So the owner holds each set's ref until the gateway releases it.
        self._held: dict[tuple[str, str], Any] = {}

    async def register(
        self,
        key: str,
        images: list[bytes],
        limits: dict[str, int],
        room: tuple[int, int],
    ) -> dict[str, Any]:
        """The stored set: ``{id, size, bytes, meta, pixels: [ObjectRef]}``.

        ``limits``: the key's image limits (``max_image_pixels``,
        ``max_image_side``, ``max_set_pixels``, ``max_images``,
        ``max_image_bytes``); ``room``: the images and decoded bytes the key
        has left. Every check runs on the headers, before anything is decoded.
        The pixels are this process's objects: if it restarts, the sets it stored
        are lost, and the gateway asks for them again (404 on the next call).
        """
        loop = asyncio.get_running_loop()
        box = await loop.run_in_executor(self._pool, _register, key, images, limits, room)
        # The same pixels again for this key: the ref it already holds, so there is one.
        box["pixels"] = [self._held.setdefault((key, box["id"]), box["pixels"][0])]
        return box

    async def release(self, key: str, set_ids: list[str] | None = None) -> int:
        """Drop this key's sets (all of them with ``set_ids`` None); how many were held.

        The gateway calls it when it forgets a set (DELETE, a removed key, a lost set).
        """
        drop = [k for k in self._held if k[0] == key and (set_ids is None or k[1] in set_ids)]
        for held in drop:
            del self._held[held]
        return len(drop)

    async def held(self) -> int:
        """How many sets' pixels this process holds (tests)."""
        return len(self._held)


def _register(
    key: str, images: list[bytes], limits: dict[str, int], room: tuple[int, int]
) -> dict[str, Any]:
    import ray

    most, side = limits["max_image_pixels"], limits["max_image_side"]
    sizes = []
    for i, data in enumerate(images):
        try:
            sizes.append(probe_image(data, max_pixels=most, max_side=side))
        except RequestError as error:  # say which image of the set
            raise _which(i, error) from None
    width, height = sizes[0]
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            raise RequestError(
                422,
                f"images[{i}] is {size[0]}x{size[1]} but images[0] is {width}x{height}: "
                "one set holds images of one size (resize them first)",
            )
    count = len(images)
    pixels = count * width * height
    if pixels > limits["max_set_pixels"]:
        what = f"pixels of a set of {count} images of {width}x{height}"
        raise over_limit("max_set_pixels", pixels, limits["max_set_pixels"], what)
    images_left, bytes_left = room
    if count > images_left:
        held = limits["max_images"] - images_left
        what = (
            f"images of key {key!r} (it may register {limits['max_images']} images in all; "
            f"{held} are registered and this set has {count})"
        )
        raise over_limit("max_images", held + count, limits["max_images"], what)
    nbytes = 3 * pixels
    if nbytes > bytes_left:
        held = limits["max_image_bytes"] - bytes_left
        what = (
            f"decoded bytes of key {key!r}'s images ({held} registered, {nbytes} in this "
            "set; DELETE /v1/oracle/image-sets/<id> frees them)"
        )
        raise over_limit("max_image_bytes", held + nbytes, limits["max_image_bytes"], what)

    stacked = np.empty((count, height, width, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        try:
            stacked[i] = decode_image(data, max_pixels=most, max_side=side)
        except RequestError as error:
            raise _which(i, error) from None
        except ValueError:  # decoded to another size than its header said
            raise RequestError(
                415, f"images[{i}]: its pixels do not match its header's size"
            ) from None
    image_set = ImageSet(stacked, {"dataset": "http", "key": key})
    ref = image_set.ref
    return {
        "id": ref.id,
        "size": ref.size,
        "bytes": nbytes,
        "meta": image_set.meta,
        "pixels": [ray.put(stacked)],  # boxed: Serve must not resolve it
    }


def _which(i: int, error: RequestError) -> RequestError:
    return RequestError(
        error.status,
        f"images[{i}]: {error}",
        kind=error.kind,
        headers=error.headers,
        extra=error.extra,
    )
