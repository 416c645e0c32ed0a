"""Request errors of the HTTP API: one JSON shape for every error, the body-size guard and bearer-token auth.

Every error body is `{"error": {"code": str, "message": str, "field": str | null}}`. Deployments return an
`ApiError` instance in place of a result for a bad item of a batch (an exception raised inside `@serve.batch`
would fail the whole batch), and the ingress raises it.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


log = logging.getLogger("ray.serve")


class ApiError(Exception):
    """A request the API refuses: HTTP status, a stable code, a message naming the input and the problem."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries inside Serve results
        return (ApiError, (self.status, self.code, self.message, self.field))

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message, "field": self.field}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map ApiError, FastAPI's validation errors and Starlette's HTTP errors (404, 405) to the error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return exc.response(headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in exc.errors()[:5]
        )
        return ApiError(422, "invalid_request", message, field).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, "http_error", str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _server_fault(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in a route")
        return ApiError(500, "internal_error", f"the server failed on this request ({type(exc).__name__})").response()


class BodyLimitMiddleware:
    """Refuse (413) any HTTP request whose body exceeds `max_bytes`, before a route parses it.

    A declared Content-Length over the limit is refused without reading; otherwise the body is read up to the
    limit (chunked uploads included) and replayed to the app, so no route ever sees a larger body.
    """

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]):
        # A callable, because the limit comes from the app settings, known only when the replica starts.
        self.app, self.limit = app, max_bytes

    @property
    def max_bytes(self) -> int:
        return self.limit()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = ApiError(413, "body_too_large", f"request body exceeds limits.max_body_bytes={self.max_bytes}")
        await error.response()(scope, receive, send)


class BearerAuth:
    """The bearer-token check of every /v1/* route; the token comes from an env var of the ingress process (never
    logged). Fails closed: with the env var empty, construction raises unless `allow_anonymous` is set."""

    def __init__(self, env_var: str, allow_anonymous: bool = False):
        self.token = os.environ.get(env_var, "")
        if not self.token and not allow_anonymous:
            raise RuntimeError(
                f"env var {env_var} is empty: set it to the bearer token on every node that runs the ingress (the "
                "K8s/AWS manifests read it from a secret), or set allow_anonymous: true for a local demo on 127.0.0.1"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    def check(self, request: Request) -> None:
        if not self.enabled:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")
