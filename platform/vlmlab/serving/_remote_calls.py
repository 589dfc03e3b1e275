"""Awaiting a call to another deployment, and telling a client's mistake from a failure.

The gateway calls the adapter replicas, the oracle replicas and the image
registrar; a mistake one of them finds in a client's request (a prompt too
long, an unknown id, a limit) comes back as that client's 4xx
(:func:`answer_of`), anything else as a failure of the server. Apart from
:mod:`vlmlab.serving._oracle_service` because both the gateway's adapter
routes and the oracle service use it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from vlmlab.errors import LimitExceededError
from vlmlab.serving._classifier import RequestError, limit_error


def user_error(error: BaseException) -> RequestError | None:
    """A client's mistake found by the oracle replica (e.g. a prompt too long), as a 4xx."""
    import ray.exceptions

    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    if isinstance(cause, RequestError):
        return cause
    if isinstance(cause, LimitExceededError):
        return limit_error(cause)
    if isinstance(cause, KeyError):
        return RequestError(404, str(cause.args[0]) if cause.args else "unknown", kind="KeyError")
    if isinstance(cause, ValueError | TypeError):
        return RequestError(422, str(cause), kind=type(cause).__name__)
    return None


async def answer_of(call: Awaitable[Any], unavailable: str | None = None) -> Any:
    """Await a call to another deployment; a client's mistake it found comes back as its 4xx.

    Any other failure is re-raised, or, with ``unavailable``, answered as a 503
    with that message.
    """
    try:
        return await call
    except Exception as error:
        mapped = user_error(error)
        if mapped is not None:
            raise mapped from None
        if unavailable is None:
            raise
        raise RequestError(503, unavailable) from None


def _lost(error: BaseException) -> bool:
    """Whether a replica failed because an image set's pixels are gone from the object store."""
    import ray.exceptions

    cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
    return isinstance(cause, ray.exceptions.ObjectLostError) or isinstance(
        error, ray.exceptions.ObjectLostError
    )
