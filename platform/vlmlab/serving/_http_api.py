"""The FastAPI app behind the gateway: its error responses, and the helpers its routes share.

``api`` is the FastAPI application that the ``Gateway`` deployment
(:mod:`vlmlab.serving._gateway`) serves as its ingress; its routes are the
gateway's methods. This module holds what does not depend on the gateway's
state: the JSON response class, the exception handlers that give every error
one shape (``{"error": ...}``, a 4xx for a client's mistake, a logged 500 for
a bug), the OpenAPI description of bodies the routes parse themselves, and
small request helpers (content type, multipart file parts, base64).
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at runtime.
import base64
import binascii
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import vlmlab
from vlmlab.serving._classifier import RequestError
from vlmlab.serving._limits import truncate

log = logging.getLogger(__name__)


class Json(JSONResponse):
    """JSON responses; NaN and infinities are written as Python's ``json`` writes them.

    Logits of finite inputs can still overflow in a model; such a response is
    sent (Python's ``json`` and ``HttpOracle`` read it), never a 500.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


api = FastAPI(
    title="vlmlab: adapted models",
    version=vlmlab.__version__,
    description=(
        "Classify images with adapted vision-language models (Black-Box Forgetting, "
        "CraFT and developmental-safety artifacts), and query the black-box model itself "
        "under an API key (`Authorization: Bearer <key>`) with a per-key query budget "
        "and rate limit. Every response names the backend: the offline ConSE stand-in "
        "is not CLIP."
    ),
)


def _has_unread_body(request: Request) -> bool:
    announced = request.headers.get("content-length", "0").strip() not in ("", "0")
    chunked = request.headers.get("transfer-encoding") is not None
    return (announced or chunked) and not getattr(request.state, "body_read", False)


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    content = {"error": truncate(str(error)), **error.extra}
    if error.kind:
        content["type"] = error.kind
    headers = dict(error.headers)
    if _has_unread_body(request):  # refused before its body was read: drop the connection
        headers["Connection"] = "close"
    pacer = getattr(request.app.state, "refusal_pacer", None)
    if pacer is not None:
        await pacer.pause(error.status)
    return Json(status_code=error.status, content=content, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _routing_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and wrong methods answer in the one error shape, ``{"error": ...}``."""
    if error.status_code == 404:
        message = f"no route {truncate(request.url.path)}; the API is listed at /docs"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {truncate(request.url.path)}"
    else:
        message = truncate(str(error.detail))
    return Json(status_code=error.status_code, content={"error": message}, headers=error.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter checks (path parameters), in the one error shape."""
    first = error.errors()[0] if error.errors() else {}
    field = ".".join(str(part) for part in first.get("loc", ()))
    message = f"{field}: {first.get('msg', 'invalid')}" if field else "invalid request"
    return Json(status_code=422, content={"error": truncate(message)})


@api.exception_handler(Exception)
async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    """A bug, never a client's mistake: logged, and answered as JSON like every error."""
    log.exception("internal error on %s %s", request.method, request.url.path)
    return Json(
        status_code=500,
        content={"error": f"internal error ({type(error).__name__})"},
        headers={"Connection": "close"},
    )


def _json_body(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """OpenAPI for a JSON body the handler parses itself (so its errors stay 4xx JSON)."""
    schema = {k: {"type": v} if isinstance(v, str) else v for k, v in properties.items()}
    return {
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": required or list(properties),
                        "properties": schema,
                    }
                }
            }
        }
    }


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class _Upload:
    """A file part of a multipart form, read."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"{name} is not valid base64") from None
