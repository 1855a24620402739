"""The client's one exception type, built from RFC 9457 problem documents.

Every failure a :class:`~qkvault.client.Client` call can meet — an HTTP error from the API, a
server it cannot reach, a job that failed, a wait that timed out — raises
:class:`QkvaultClientError` (or a subclass), so ``except QkvaultClientError`` catches them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkvault.job import Job


def _format_location(loc: Any) -> str:
    """``["body", "prompts", 0]`` or ``"body.prompts.0"`` -> ``prompts.0`` (FastAPI prefixes body fields)."""
    parts = [str(p) for p in loc] if isinstance(loc, list | tuple) else str(loc).split(".")
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "(body)"


def _msg(err: Any) -> str:
    if isinstance(err, Mapping):
        return str(err.get("msg", err.get("message", err.get("detail", ""))))
    return str(err)


def format_errors(errors: Any) -> list[str]:
    """One line per entry of a problem's ``errors`` list (FastAPI/pydantic ``{loc, msg}`` or free form)."""
    if not errors:
        return []
    if not isinstance(errors, list | tuple):
        errors = [errors]
    lines = []
    for err in errors:
        if isinstance(err, Mapping):
            where = err.get("loc", err.get("pointer", err.get("field")))
            msg = err.get("msg", err.get("message", err.get("detail", "")))
            lines.append(f"{_format_location(where)}: {msg}" if where is not None else str(msg or err))
        else:
            lines.append(str(err))
    return lines


class QkvaultClientError(Exception):
    """An error reported by (or on the way to) the qkvault API.

    Attributes mirror the problem document: ``status`` (HTTP status, ``None`` when the server was
    not reached), ``type``, ``title``, ``detail`` and ``errors`` (per-field validation errors, when
    given). ``problem`` keeps the whole document.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        type: str | None = None,
        title: str | None = None,
        detail: str | None = None,
        errors: list[Any] | None = None,
        problem: Mapping[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.errors = errors
        self.problem: dict[str, Any] = dict(problem or {})
        if message is None:
            message = self._compose()
        self.message = message
        super().__init__(message)

    def _compose(self) -> str:
        head = " ".join(p for p in (str(self.status) if self.status else "", self.title or "") if p)
        lines = format_errors(self.errors)
        detail = self.detail
        if lines and head and detail and all(_msg(e) in detail for e in self.errors or []):
            detail = None  # a summary of the same errors, listed one per line below
        text = f"{head}: {detail}" if head and detail else head or detail or "request failed"
        if lines:
            text += "\n" + "\n".join(f"  - {line}" for line in lines)
        return text

    @classmethod
    def from_problem(cls, problem: Mapping[str, Any], *, status: int | None = None) -> QkvaultClientError:
        """Build from a problem document; ``status`` (the HTTP status) is used when the document has none."""
        raw_status = problem.get("status", status)
        errors = problem.get("errors")
        detail = problem.get("detail")
        valid_status = isinstance(raw_status, int | str) and str(raw_status).isdigit()
        return cls(
            status=int(raw_status) if valid_status else status,
            type=str(problem["type"]) if problem.get("type") is not None else None,
            title=str(problem["title"]) if problem.get("title") is not None else None,
            detail=detail if isinstance(detail, str) or detail is None else str(detail),
            errors=list(errors) if isinstance(errors, list | tuple) else ([errors] if errors else None),
            problem=problem,
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (multiprocessing, notebooks)
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type[QkvaultClientError], message: str, state: dict[str, Any]) -> QkvaultClientError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class JobFailed(QkvaultClientError):
    """The job ended in state ``failed``; the fields hold the server's error, ``job`` the final job."""

    job: Job | None

    def __init__(self, job: Job) -> None:
        problem = dict(job.error or {})
        base = QkvaultClientError.from_problem(problem) if problem else None
        detail = base.detail if base else None
        title = base.title if base else None
        summary = ": ".join(p for p in (title, detail) if p) or "no error details recorded"
        message = f"job {job.id} failed: {summary}"
        lines = format_errors(base.errors if base else None)
        if lines:
            message += "\n" + "\n".join(f"  - {line}" for line in lines)
        super().__init__(
            message,
            status=base.status if base else None,
            type=base.type if base else None,
            title=title,
            detail=detail,
            errors=base.errors if base else None,
            problem=problem,
        )
        self.job = job


class WaitTimeout(QkvaultClientError, TimeoutError):
    """``Client.wait`` gave up before the job finished (the job keeps running on the server)."""
