"""Plain ASGI middlewares of the endpoint. They sit outside the routes, so they also cover
unknown paths, the OpenAPI document and the web page.

Order (outermost first): RequestMetrics, CORS (when configured), BearerAuth (when a token is
set), BodyLimit. Metrics see every answer, 401s and 413s included; CORS answers preflights before
auth and adds its headers to every answer, refusals included.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse


class ApiError(Exception):
    """A refusal with its HTTP status; the app turns it into {"detail": reason, "code": code}."""

    def __init__(self, status: int, code: str, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status, self.code, self.reason, self.headers = status, code, reason, headers


def error_response(status: int, code: str, reason: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": reason, "code": code}, status_code=status, headers=headers)


def app_path(scope) -> str:
    """The request path below the application's route prefix."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


class RequestMetrics:
    def __init__(self, app, observe: Callable[[str, int, float], None]):
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # an exception before any answer is a server error

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.observe(app_path(scope), status, (time.perf_counter() - started) * 1000)


class BearerAuth:
    """Every route except `open_paths` needs `Authorization: Bearer <token>`."""

    def __init__(self, app, token: str, open_paths: tuple[str, ...] = ("/v1/health",)):
        self.app, self.token, self.open_paths = app, token.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and app_path(scope) not in self.open_paths:
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            # compare_digest: the time taken does not depend on how much of the token matched
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
                response = error_response(401, "unauthorized", "missing or wrong bearer token",
                                          headers={"WWW-Authenticate": 'Bearer realm="brainseg"'})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, else once the streamed body
    passes the limit (the route reading it gets ApiError)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(413, "body_too_large", f"the request body is over the limit of "
                                               f"{self.max_bytes / 1e6:g} MB")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await error_response(400, "bad_content_length", f"invalid Content-Length {declared!r}")(
                    scope, receive, send)
            if int(declared) > self.max_bytes:
                error = self._too_large()
                return await error_response(error.status, error.code, error.reason)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)
