"""Every error leaves the API as an RFC 9457 problem document (``application/problem+json``).

Members: ``type`` (a slug shared with :mod:`storage.errors` and the job ``error`` field, or
``about:blank`` for plain HTTP errors), ``title``, ``status``, ``detail``, ``instance`` (the request
path), plus ``errors: [{loc, msg, type}]`` for field-level validation failures (``loc`` is a dotted
path such as ``body.generation.max_new_tokens``). Stack traces are logged, never sent; an unexpected
error is a 500 ``internal-error`` with the ``error_id`` it is logged under, and leaves the connection
open (:class:`UnexpectedErrors`). A database that stays unavailable past the retry budget
(``QKVAULT_DB_RETRY_S``) is a 503 ``index-unavailable`` with ``Retry-After``, never a 500: from the
index's :class:`~storage.errors.IndexUnavailable`, or a transient database error that escaped it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.errors import IndexUnavailable, QkvaultError
from storage.index.retry import is_transient

log = logging.getLogger("qkvault.api")

PROBLEM_JSON = "application/problem+json"
VALIDATION_ERROR = "validation-error"
LIMIT_EXCEEDED = "limit-exceeded"
INTERNAL_ERROR = "internal-error"


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON


class ApiProblem(Exception):
    """Raised by a handler for an error that has no :class:`QkvaultError` type (bad cursor, limits)."""

    def __init__(
        self,
        status: int,
        type_: str,
        detail: str,
        *,
        title: str | None = None,
        errors: Sequence[Mapping[str, Any]] | None = None,
        extensions: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type_
        self.title = title or _phrase(status)
        self.detail = detail
        self.errors = errors
        self.extensions = extensions
        self.headers = headers


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def field_error(loc: str, msg: str, type_: str) -> dict[str, str]:
    return {"loc": loc, "msg": msg, "type": type_}


def problem_response(
    request: Request,
    *,
    status: int,
    type_: str,
    title: str,
    detail: str,
    errors: Sequence[Mapping[str, Any]] | None = None,
    extensions: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProblemResponse:
    body: dict[str, Any] = dict(extensions or {})
    body.update(type=type_, title=title, status=status, detail=detail, instance=request.url.path)
    if errors is not None:
        body["errors"] = [dict(e) for e in errors]
    return ProblemResponse(body, status_code=status, headers=dict(headers or {}))


def _dotted(loc: Sequence[int | str]) -> str:
    return ".".join(str(part) for part in loc)


def _clean_msg(msg: str) -> str:
    # pydantic prefixes messages of validators that raised ValueError/AssertionError
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


async def _on_validation_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        field_error(_dotted(e.get("loc", ())), _clean_msg(str(e.get("msg", ""))), str(e.get("type", "")))
        for e in exc.errors()
    ]
    summary = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return problem_response(
        request,
        status=422,
        type_=VALIDATION_ERROR,
        title="Request validation failed",
        detail=f"{len(errors)} invalid field{'s' if len(errors) != 1 else ''}: {summary}{more}",
        errors=errors,
    )


async def _on_qkvault_error(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, QkvaultError)
    doc = exc.to_problem()
    if exc.status >= 500:
        log.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status, exc.message)
    field = exc.detail.get("field")
    errors = [field_error(f"body.{field}", exc.message, doc["type"])] if isinstance(field, str) else None
    extensions = {k: v for k, v in doc.items() if k not in {"type", "title", "detail"}}
    retry_after = exc.retry_after_s if isinstance(exc, IndexUnavailable) else None
    return problem_response(
        request,
        status=exc.status,
        type_=doc["type"],
        title=doc["title"],
        detail=doc["detail"],
        errors=errors,
        extensions=extensions,
        headers={"Retry-After": str(retry_after)} if retry_after is not None else None,
    )


async def _on_api_problem(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, ApiProblem)
    return problem_response(
        request,
        status=exc.status,
        type_=exc.type,
        title=exc.title,
        detail=exc.detail,
        errors=exc.errors,
        extensions=exc.extensions,
        headers=exc.headers,
    )


async def _on_http_exception(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    phrase = _phrase(exc.status_code)
    detail = exc.detail if isinstance(exc.detail, str) else phrase
    return problem_response(
        request,
        status=exc.status_code,
        type_="about:blank",
        title=phrase,
        detail=detail,
        headers=exc.headers,
    )


def _unexpected(request: Request, exc: Exception) -> ProblemResponse:
    error_id = uuid.uuid4().hex
    log.error("unhandled error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return problem_response(
        request,
        status=500,
        type_=INTERNAL_ERROR,
        title="Internal Server Error",
        detail=f"unexpected server error; the server log has the details under error id {error_id}",
        extensions={"error_id": error_id},
    )


class UnexpectedErrors:
    """Pure ASGI middleware, the outermost one: an exception no handler took is answered with the
    500 problem document and the request ends normally, so its keep-alive connection serves the next
    request.

    Not Starlette's catch-all (an ``Exception`` handler runs in ``ServerErrorMiddleware``, which
    re-raises after sending the response): uvicorn closes the connection of an app that raised, and
    a client's next request on it was reset. Once the response has started (a download failing
    midway) the exception still propagates: closing the connection is then how the client learns
    that the body is incomplete.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if started:
                raise
            request = Request(scope)
            if is_transient(exc):  # a database error no retry saw (the index retries its own)
                unavailable = IndexUnavailable(
                    f"the index database is unavailable ({type(exc).__name__}); try again shortly",
                    retry_after_s=1,
                )
                response = await _on_qkvault_error(request, unavailable)
                await response(scope, receive, send)
                return
            await _unexpected(request, exc)(scope, receive, send)


def install_problem_handlers(app: FastAPI) -> None:
    """Problem documents for every error. Call it after adding the app's other middleware, so that
    :class:`UnexpectedErrors` wraps them too."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(QkvaultError, _on_qkvault_error)
    app.add_exception_handler(ApiProblem, _on_api_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_middleware(UnexpectedErrors)  # added last: the outermost of the app's middleware


def presign_lifetime(expires_in: int | None, default_s: int, max_s: int) -> int:
    """A presigned URL's lifetime in seconds: ``expires_in`` or the server's default; a 422 past
    the server's limit (``QKVAULT_PRESIGN_MAX_EXPIRES_S``)."""
    lifetime = expires_in if expires_in is not None else default_s
    if lifetime > max_s:
        raise ApiProblem(
            422,
            "validation-error",
            f"expires_in={lifetime} exceeds this server's limit of {max_s} s "
            "(QKVAULT_PRESIGN_MAX_EXPIRES_S); ask for a shorter lifetime",
            title="Request validation failed",
            errors=[field_error("query.expires_in", "too long", "less_than_equal")],
        )
    return lifetime
