"""The rows of a bulk job's source, streamed in the job's order.

:func:`iter_rows` yields one :class:`SourceRow` per sequence: its position in the job (``index``,
0, 1, ...), the row it came from (``row``: line or record number in the source), and its text or its
token ids. ``offset`` and ``limit`` select rows before the seeded ``shuffle``; a row that is neither
text nor a list of token ids raises :class:`SourceRowError`, naming the row. Reading a source twice
gives the same rows in the same order (a resumed attempt relies on it).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.errors import InvalidJobSpec
from storage.inputs import utf8_text
from storage.sources.spec import DatasetSource, FileSource, PromptsSource, SourceSpec, TokenIdsSource

if TYPE_CHECKING:
    from storage.stores.objectstore import ObjectStore

__all__ = ["RawRow", "SourceContext", "SourceRow", "SourceRowError", "iter_rows", "row_value"]

RawRow = tuple[int, str | None, tuple[int, ...] | None]  # (row number, text, token ids)
MAX_TOKEN_ID = 2**31 - 1  # as source.token_ids allows


@dataclass(frozen=True)
class SourceRow:
    """One sequence of a bulk job: ``text`` or ``token_ids`` (exactly one is set)."""

    index: int
    row: int
    text: str | None = None
    token_ids: tuple[int, ...] | None = None


class SourceRowError(InvalidJobSpec):
    """A row of the source that cannot be a sequence (the message names the row and why)."""


@dataclass(frozen=True)
class SourceContext:
    """Where sources live for this process: the object store holding uploads and the owner of the
    job (a ``file`` source reads only that owner's uploads), the local folder of Hugging Face
    datasets (``ServiceSettings.datasets_root()``)."""

    store: ObjectStore | None = None
    datasets_dir: Path | None = None
    owner: str | None = None


def row_value(value: Any, where: str, row: int | None = None) -> tuple[str | None, tuple[int, ...] | None]:
    """A field's value as (text, token ids): a non-empty string, or a non-empty list of
    non-negative integers; anything else raises :class:`SourceRowError` naming ``where`` (and
    ``row`` in its detail)."""
    detail: dict[str, Any] = {"field": "source"} if row is None else {"field": "source", "row": row}
    if isinstance(value, str):
        if not value:
            raise SourceRowError(
                f"{where} is an empty text: every sequence needs at least one character", detail=detail
            )
        try:
            utf8_text(value, where)
        except ValueError as exc:  # a lone surrogate ("\\ud800" in JSON): no tokenizer takes it
            raise SourceRowError(str(exc), detail=detail) from None
        return value, None
    if (
        isinstance(value, list | tuple)
        and value
        and all(type(v) is int and 0 <= v <= MAX_TOKEN_ID for v in value)
    ):
        return None, tuple(int(v) for v in value)
    shown = repr(value)[:80]
    raise SourceRowError(
        f"{where} is {shown}: a sequence is a text or a non-empty list of token ids", detail=detail
    )


def _raw_rows(
    source: SourceSpec, context: SourceContext
) -> Iterator[tuple[int, str | None, tuple[int, ...] | None]]:
    """(row number, text, token ids) of every row of the source, in the source's order."""
    if isinstance(source, PromptsSource):
        for row, prompt in enumerate(source.prompts):
            yield row, prompt, None
    elif isinstance(source, TokenIdsSource):
        for row, ids in enumerate(source.token_ids):
            yield row, None, tuple(ids)
    elif isinstance(source, FileSource | DatasetSource):
        from storage.sources.readers import read_rows

        yield from read_rows(source, context)
    else:  # pragma: no cover - the discriminated union has no other kind
        raise TypeError(f"unknown source {source!r}")


def iter_rows(source: SourceSpec, context: SourceContext | None = None) -> Iterator[SourceRow]:
    """The job's sequences: rows ``offset .. offset + limit`` of the source, shuffled when asked."""
    raw = _raw_rows(source, context or SourceContext())
    stop = None if source.limit is None else source.offset + source.limit
    selected: Iterable[RawRow] = itertools.islice(raw, source.offset, stop)
    if source.shuffle_seed is not None:
        selected = _buffer_shuffle(selected, source.shuffle_buffer, source.shuffle_seed)
    index = -1
    for index, (row, text, ids) in enumerate(selected):
        yield SourceRow(index, row, text, ids)
    if index < 0:
        raise SourceRowError(
            f"no rows left after source.offset {source.offset}: the source has at most "
            f"{source.offset} rows; lower source.offset",
            detail={"field": "source.offset"},
        )


def _buffer_shuffle(rows: Iterable[RawRow], buffer_size: int, seed: int) -> Iterator[RawRow]:
    """Shuffle a stream through a buffer of ``buffer_size`` items (as ``datasets``' streaming
    shuffle does): each output is a random pick from the buffer, refilled from the stream."""
    rng = random.Random(seed)
    buffer: list[RawRow] = []
    for item in rows:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        pick = rng.randrange(buffer_size)
        yield buffer[pick]
        buffer[pick] = item
    rng.shuffle(buffer)
    yield from buffer
