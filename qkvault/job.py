"""Client-side view of a job (``JobPublic`` from the API): small frozen models that print well.

The fields are not written out here: :class:`Job` and :class:`Progress` subclass the one declaration
of the job document, :mod:`storage.jobs.fields` (the API's ``JobPublic`` is the same model).
``str(job)`` is a few aligned lines for a terminal, ``job._repr_html_()`` a table for Jupyter.
Parsing is lenient: fields the API adds later are ignored, missing ones take defaults.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

from storage.jobs.fields import TERMINAL_STATES, JobFields
from storage.jobs.fields import Progress as JobProgress

__all__ = ["TERMINAL_STATES", "Job", "JobPage", "Progress", "human_bytes"]


def human_bytes(n_bytes: float) -> str:
    """Decimal units, as a researcher reads them: ``3.4 MB``."""
    value = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _tokens(done: int, total: int) -> str:
    """``1,234/50,000 tokens`` (``1,234 tokens`` while the total is unknown)."""
    return f"{done:,}/{total:,} tokens" if total else f"{done:,} tokens"


def _duration(start: datetime | None, end: datetime | None) -> str | None:
    if start is None or end is None:
        return None
    try:
        seconds = (end - start).total_seconds()
    except TypeError:  # naive vs aware
        return None
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


class _Lenient(BaseModel):
    """Reads any server's job document: fields it lacks take their declared defaults (every field
    added to :class:`storage.jobs.fields.JobFields` after the first release has one), fields it adds
    are ignored, and a value of the wrong type falls back to the field's default."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    @field_validator("*", mode="wrap")
    @classmethod
    def _default_when_invalid(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            field = cls.model_fields[info.field_name]
            if field.is_required():
                raise
            return field.get_default(call_default_factory=True)


class Progress(JobProgress, _Lenient):
    """Progress of a job: the API's ``progress`` (:class:`storage.jobs.fields.Progress`)."""

    @classmethod
    def from_api(cls, data: Mapping[str, Any] | None) -> Progress:
        return cls.model_validate(data or {})

    @property
    def ratio(self) -> float | None:
        """Fraction done in [0, 1], from the API's ``fraction`` or the unit counts; ``None`` if unknown."""
        if self.fraction is not None:
            return min(max(self.fraction, 0.0), 1.0)
        if self.units_total > 0:
            return min(self.units_done / self.units_total, 1.0)
        return None


class Job(JobFields, _Lenient):
    """One export job as the API reports it (``GET /v1/jobs/{id}``). Its fields are the API's, declared
    once in :class:`storage.jobs.fields.JobFields`; a field added there appears here too."""

    progress: Progress = Field(default_factory=Progress)
    spec: dict[str, Any] = Field(default_factory=dict, repr=False)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Job:
        if not isinstance(data, Mapping) or "id" not in data:
            raise ValueError(f"not a job document (no 'id'): {str(data)[:200]}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"not a job document: {exc}") from exc

    # -- state ---------------------------------------------------------------------------------
    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    @property
    def _unit_name(self) -> str:
        """What a unit of progress is: a bulk job counts sequences, a one-batch job layer steps."""
        return "sequences" if self.spec.get("source") else "units"

    @property
    def elapsed(self) -> str | None:
        return _duration(self.started_at, self.finished_at or self.updated_at)

    # -- rendering -----------------------------------------------------------------------------
    def status_line(self) -> str:
        """One line for progress displays: ``[running] prefill 12/60 units 20% 3.4 MB``."""
        parts = [f"[{self.state}]"]
        if self.phase:
            parts.append(self.phase)
        elif self.state == "queued":
            parts.append("waiting for a worker")
        p = self.progress
        if p.units_total > 0:
            parts.append(f"{p.units_done}/{p.units_total} {self._unit_name}")
        if p.ratio is not None:
            parts.append(f"{p.ratio * 100:.0f}%")
        if p.tokens_done or p.tokens_total:
            parts.append(_tokens(p.tokens_done, p.tokens_total))
        if p.bytes_written:
            parts.append(human_bytes(p.bytes_written))
        if self.cancel_requested and self.state not in ("cancelling", "cancelled"):
            parts.append("(cancel requested)")
        return " ".join(parts)

    def _rows(self) -> list[tuple[str, str]]:
        p = self.progress
        rows: list[tuple[str, str]] = [("state", self.state + (" (partial)" if self.partial else ""))]
        if self.label:
            rows.append(("label", self.label))
        model = (self.spec.get("model") or {}).get("id") if isinstance(self.spec.get("model"), dict) else None
        if model:
            n_prompts = len(self.spec.get("prompts") or [])
            rows.append(("model", f"{model}, {n_prompts} prompt{'s' if n_prompts != 1 else ''}"))
        if self.phase:
            rows.append(("phase", self.phase))
        progress = []
        if p.units_total:
            progress.append(f"{p.units_done}/{p.units_total} {self._unit_name}")
        if p.ratio is not None:
            progress.append(f"{p.ratio * 100:.0f}%")
        if p.tokens_done or p.tokens_total:
            progress.append(_tokens(p.tokens_done, p.tokens_total))
        if p.bytes_written or p.chunks_written:
            progress.append(f"{human_bytes(p.bytes_written)} in {p.chunks_written} chunks")
        if progress:
            rows.append(("progress", ", ".join(progress)))
        times = [f"created {self.created_at:%Y-%m-%d %H:%M:%S}"] if self.created_at else []
        if self.elapsed:
            times.append(f"{'ran' if self.finished_at else 'running for'} {self.elapsed}")
        if times:
            rows.append(("time", ", ".join(times)))
        if self.attempts > 1:
            rows.append(("attempts", str(self.attempts)))
        if self.cancel_requested:
            rows.append(("cancel", "requested"))
        if self.error:
            title = self.error.get("title") or self.error.get("type") or "error"
            detail = self.error.get("detail")
            key = "retrying" if self.error.get("retrying") else "error"  # given back: queued again
            rows.append((key, f"{title}: {detail}" if detail else str(title)))
        return rows

    def __str__(self) -> str:
        lines = [f"job {self.id}"]
        lines += [f"  {key:<9} {value}" for key, value in self._rows()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colors = {"succeeded": "#1a7f37", "failed": "#cf222e", "cancelled": "#9a6700"}
        color = colors.get(self.state, "#0969da")
        rows = []
        for key, value in self._rows():
            cell = html.escape(value)
            if key == "state":
                cell = f'<b style="color:{color}">{cell}</b>'
            rows.append(f'<tr><th style="text-align:left">{html.escape(key)}</th><td>{cell}</td></tr>')
        ratio = self.progress.ratio
        bar = (
            f'<progress value="{ratio:.3f}" max="1" style="width:16em"></progress>'
            if ratio is not None and not self.terminal
            else ""
        )
        return (
            f"<div><b>qkvault job</b> <code>{html.escape(self.id)}</code>{bar}"
            f'<table style="margin-top:4px">{"".join(rows)}</table></div>'
        )


@dataclass(frozen=True)
class JobPage:
    """One page of ``GET /v1/jobs``; pass ``next_cursor`` back as ``cursor`` for the next page."""

    items: tuple[Job, ...]
    next_cursor: str | None = None

    def __iter__(self) -> Iterator[Job]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def _table(self) -> list[tuple[str, str, str, str, str]]:
        out = []
        for job in self.items:
            created = f"{job.created_at:%Y-%m-%d %H:%M}" if job.created_at else ""
            ratio = job.progress.ratio
            out.append(
                (
                    job.id,
                    job.state,
                    f"{ratio * 100:.0f}%" if ratio is not None else "",
                    created,
                    job.label or "",
                )
            )
        return out

    def __str__(self) -> str:
        if not self.items:
            return "no jobs"
        rows = [("ID", "STATE", "DONE", "CREATED", "LABEL"), *self._table()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(f"{r[i]:<{widths[i]}}" for i in range(4)) + "  " + r[4] for r in rows]
        if self.next_cursor:
            lines.append(f"(more: --cursor {self.next_cursor})")
        return "\n".join(line.rstrip() for line in lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("id", "state", "done", "created", "label"))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self._table()
        )
        return f"<table><tr>{head}</tr>{body}</table>"
