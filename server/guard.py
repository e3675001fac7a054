"""ASGI middleware in front of every route: the API key on /v1/* and the request body size cap.

Both run before FastAPI reads the body: an unauthenticated or oversized request costs no parsing, and the
check also covers /v1 paths that match no route (a client without the key learns nothing about them).
"""
from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hybridserve.server.errors import invalid_request, request_too_large, unauthorized

PROTECTED_PREFIX = "/v1"


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class RequestGuard:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_request_bytes: int) -> None:
        self.app = app
        # Compare digests, not the keys: equal lengths, so the comparison time says nothing about the key.
        self.key_digest = _digest(api_key.encode()) if api_key else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.key_digest is not None and (path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")):
            problem = self._auth_problem(scope)
            if problem is not None:
                await unauthorized(problem).response()(scope, receive, send)
                return
        length = _header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await invalid_request("Content-Length is not a number.").response()(scope, receive, send)
                return
            if int(length) > self.max_request_bytes:
                await request_too_large(self.max_request_bytes, int(length)).response()(scope, receive, send)
                return
        # Buffer the body (the JSON routes read all of it anyway) so a chunked upload with no Content-Length
        # is also cut off at the limit, then replay it; later receive() calls (disconnect) pass through.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_request_bytes:
                await request_too_large(self.max_request_bytes).response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _auth_problem(self, scope: Scope) -> str | None:
        value = _header(scope, b"authorization")
        if value is None:
            return "Missing API key. Send it as 'Authorization: Bearer <key>'."
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "Unsupported authorization scheme. Send the API key as 'Authorization: Bearer <key>'."
        if not hmac.compare_digest(_digest(token.strip().encode()), self.key_digest):
            return "Incorrect API key."
        return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
