"""Pure ASGI middleware: refuse request bodies larger than ``max_request_bytes`` with a 413 problem."""

from __future__ import annotations

from collections.abc import Collection
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem_response


class BodySizeLimit:
    """A declared ``Content-Length`` over the limit is answered before the body is read; a chunked
    body is counted while it streams in (FastAPI re-raises the HTTPException from ``receive``).

    ``streamed``: ``(method, path)`` of the routes that stream their body into the store and enforce
    a limit of their own (``POST /v1/uploads``: ``QKVAULT_MAX_UPLOAD_BYTES``); not limited here."""

    def __init__(self, app: ASGIApp, max_bytes: int, streamed: Collection[tuple[str, str]] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.streamed = frozenset(streamed)

    def _is_streamed(self, scope: Scope) -> bool:
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return (scope["method"], path.rstrip("/") or "/") in self.streamed

    def _too_large(self, size: str) -> str:
        return (
            f"request body of {size} bytes exceeds this server's limit of {self.max_bytes} bytes "
            "(QKVAULT_MAX_REQUEST_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_streamed(scope):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = problem_response(
                Request(scope),
                status=413,
                type_="about:blank",
                title=HTTPStatus.REQUEST_ENTITY_TOO_LARGE.phrase,
                detail=self._too_large(declared.decode()),
            )
            await response(scope, receive, send)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._too_large(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, limited_receive, send)
