"""The API's front door: the token is checked, and the body bounded, before
any route reads a byte of the request body.

FastAPI reads (and buffers) a body before its dependencies run, so a token
check written as a dependency comes too late: an 800 MiB POST without a token
was read whole before its 401. This plain ASGI middleware answers first:

- a request to a protected path without the right bearer token gets 401
  without its body being read;
- a body larger than ``max_body`` gets 413, judged by ``Content-Length`` when
  given and by counting while it streams when not (chunked): at most
  ``max_body`` bytes are ever held.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
ErrorResponse = Callable[[int, str, str, "dict[str, str] | None"], Response]

MAX_BODY = 64 * 1024  # the largest body the API takes (a registration) is < 1 KiB

UNAUTHORIZED = ("missing or wrong API token (see <data-dir>/api-token or BACKHAUL_TOKEN)")


def token_ok(header: str, token: bytes) -> bool:
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(value.strip().encode(), token)


def protected(path: str) -> bool:
    """Paths that need the token: the API and its schema. Everything else is
    /health or a 404 that reads no body."""
    return path.startswith("/api/") or path in ("/openapi.json", "/docs", "/redoc")


class RequestGuard:
    def __init__(self, app: ASGIApp, *, token: str, error: ErrorResponse,
                 max_body: int = MAX_BODY) -> None:
        self.app = app
        self.token = token.encode()
        self.error = error
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if protected(scope.get("path", "")) and not token_ok(headers.get("authorization", ""),
                                                              self.token):
            await self._refuse(scope, receive, send, 401, "unauthorized", UNAUTHORIZED,
                               {"WWW-Authenticate": "Bearer"})
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await self._refuse(scope, receive, send, 400, "invalid_request",
                                   "Content-Length is not a number")
                return
            if int(length) > self.max_body:
                await self._too_large(scope, receive, send)
                return
        if length is None and "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)  # no body at all
            return
        # Read the (small) body here, counting, and replay it to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(scope, receive, send, 413, "request_too_large",
                           f"request body larger than {self.max_body} bytes")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int,
                      code: str, message: str, headers: dict[str, str] | None = None) -> None:
        # ``Connection: close``: the unread body is not drained, the server
        # drops the connection after this answer instead.
        response = self.error(status, code, message, {**(headers or {}), "Connection": "close"})
        await response(scope, receive, send)


def listen_warning(host: str) -> str | None:
    """A warning when the API listens beyond loopback: it speaks plain HTTP, so
    the token and every answer cross the network readable by anyone on it."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    if loopback:
        return None
    return (f"the API listens on {host}, beyond loopback, over plain HTTP: the token and "
            "every answer cross the network in clear. Put a TLS-terminating reverse proxy "
            "(nginx, Caddy, HAProxy) in front and listen on 127.0.0.1 only, or keep this "
            "network private")
