"""The service's HTTP side: a FastAPI application (served by uvicorn, see :class:`.service.Service`).

Kept apart from ``service.py`` because FastAPI reads the handlers' annotations at run time, so this
module imports FastAPI at its top (and without postponed annotations); ``service.py`` imports it only
when a service is built, so the event filter and the queue work without the ``webhook`` extra.
"""

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

if TYPE_CHECKING:  # pragma: no cover
    from .service import Service

SECRET_HEADER = "X-Webhook-Secret"
#: Seconds a client has to send the whole body.
BODY_TIMEOUT = 10.0
ROUTES = "POST the webhook to / or /webhook; GET /healthz or /jobs"


class _TooLarge(Exception):
    """The body is over the limit."""


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes whether or not a Content-Length says so
    (a chunked body has none)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: "Service") -> FastAPI:
    """The application of ``service``: the webhook (``POST /``, ``POST /webhook``), ``GET /healthz``
    and ``GET /jobs``. Every answer is JSON; errors are ``{"error": message}``."""
    app = FastAPI(title="hub-backdoor webhook", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        # the service's own error shape rather than FastAPI's {"detail": ...}
        message = ROUTES if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def webhook(request: Request) -> JSONResponse:
        secret = request.headers.get(SECRET_HEADER)
        if not service.authorized(secret):  # before the body is read: a stranger costs nothing
            return JSONResponse({"error": f"missing or wrong {SECRET_HEADER}"}, status_code=401)
        limit = service.config.max_body
        too_large = JSONResponse({"error": f"the body is over {limit} bytes"}, status_code=413)
        try:
            length = int(request.headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            return JSONResponse({"error": "bad Content-Length"}, status_code=400)
        if length > limit:  # refused before reading it
            return too_large
        try:  # a client that stops mid-body does not hold the connection
            body = await asyncio.wait_for(_read_body(request, limit), BODY_TIMEOUT)
        except _TooLarge:
            return too_large
        except asyncio.TimeoutError:
            late = f"the body did not arrive within {BODY_TIMEOUT:g} s"
            return JSONResponse({"error": late}, status_code=408)
        # the SQLite commits (fsync) run off the event loop
        status, answer = await run_in_threadpool(service.handle, secret, body)
        headers = {"Retry-After": "60"} if status == 503 else None
        return JSONResponse(answer, status_code=status, headers=headers)

    app.add_api_route("/", webhook, methods=["POST"])
    app.add_api_route("/webhook", webhook, methods=["POST"])

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "jobs": service.store.counts()}

    @app.get("/jobs")
    def jobs(request: Request) -> JSONResponse:
        if not service.authorized(request.headers.get(SECRET_HEADER)):
            return JSONResponse({"error": f"missing or wrong {SECRET_HEADER}"}, status_code=401)
        store = service.store
        listing = [j.to_dict() for j in store.jobs()]
        return JSONResponse({"jobs": listing, "events": store.events(), "counts": store.counts()})

    return app
