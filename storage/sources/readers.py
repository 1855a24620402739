"""The rows of ``file`` and ``dataset`` sources, streamed: :func:`read_rows` (used by
:func:`storage.sources.rows.iter_rows`, which applies offset, limit and shuffle).

A ``file`` source is an upload of the job's owner (:mod:`storage.stores.uploads`), read from the
object store piece by piece (local or S3, the same code):

- ``jsonl``: one JSON object per line; the sequence is its ``field`` (default ``text``): a string,
  or a list of token ids;
- ``parquet``: the column ``field`` (default ``text``) of string or list-of-integer values, read
  one record batch at a time (``ParquetFile.iter_batches(columns=[field])``);
- ``text``: one prompt per line (use JSONL for prompts that hold line breaks).

Row numbers are 0-based. In the two line formats row ``r`` is line ``r + 1`` of the file, always:
blank lines (empty or only whitespace) are skipped but keep their numbers, so a row's number says
where it is in the file; ``offset`` and ``limit`` count the rows read (a blank line is no row). A
``\\r\\n`` line end and a UTF-8 byte-order mark are accepted. A ``dataset`` source is read by
:mod:`storage.sources.hfdatasets`.

Every bad source raises :class:`~storage.sources.rows.SourceRowError` naming what is wrong and, for
a row, which one: an upload that does not exist (or belongs to another owner), a line that is not
UTF-8 or not JSON, a record without the field (its fields listed), a file that is not Parquet, a
missing column (the columns listed), a value that is neither text nor token ids, a source with no
rows at all.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from typing import IO, Any

from storage.sources.rows import RawRow, SourceContext, SourceRowError, row_value
from storage.sources.spec import DatasetSource, FileSource

__all__ = ["DEFAULT_FIELD", "MAX_LINE_BYTES", "file_field", "jsonl_value", "open_parquet", "read_rows"]

DEFAULT_FIELD = "text"
MAX_LINE_BYTES = 64 << 20  # one line of a JSONL or text file; longer: an error naming the line
PIECE_BYTES = 1 << 20  # read from the store at a time
PARQUET_BATCH_ROWS = 1024
_BOM = b"\xef\xbb\xbf"


def file_field(source: FileSource) -> str:
    """The JSONL field / Parquet column a file source reads (``field``, default ``text``)."""
    return source.field or DEFAULT_FIELD


def read_rows(source: FileSource | DatasetSource, context: SourceContext) -> Generator[RawRow, None, None]:
    """(row number, text, token ids) of every row of the source, in the source's order, streamed."""
    if isinstance(source, FileSource):
        rows = _file_rows(source, context)
        what = f"upload {source.upload} ({source.format})"
    else:
        from storage.sources.hfdatasets import dataset_rows

        rows = dataset_rows(source, context)
        what = f"dataset {source.path!r}, split {source.split!r}"
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise SourceRowError(f"{what} has no rows: the source is empty", detail={"field": "source"})


def _file_rows(source: FileSource, context: SourceContext) -> Iterator[RawRow]:
    if context.store is None or context.owner is None:
        raise SourceRowError(
            "this process cannot read file sources: it has no object store or job owner "
            "(SourceContext.store, .owner)"
        )
    from storage.stores.uploads import open_upload

    try:
        fh = open_upload(context.store, context.owner, source.upload)
    except FileNotFoundError:
        raise SourceRowError(
            f"upload {source.upload!r} not found: no upload of this id belongs to the job's owner, or "
            "its file has not arrived yet (a presigned upload: PUT the file to its URL first); upload "
            "the file with POST /v1/uploads using the same API key",
            detail={"field": "source.upload"},
        ) from None
    what = f"upload {source.upload}"
    with fh:
        if source.format == "parquet":
            yield from _parquet_rows(fh, file_field(source), what)
        elif source.format == "jsonl":
            yield from _jsonl_rows(fh, file_field(source), what)
        else:
            for number, line in _text_lines(fh, what):
                text, _ = row_value(line, f"{what} line {number + 1} (row {number})", number)
                yield number, text, None


def _lines(fh: IO[bytes], what: str) -> Iterator[tuple[int, bytes]]:
    """(0-based line number, line without its end) of a file read in pieces."""

    def too_long(number: int) -> SourceRowError:
        return SourceRowError(
            f"{what} line {number + 1} (row {number}) is longer than {MAX_LINE_BYTES} bytes: is the "
            "file really one record per line?",
            detail={"field": "source.format", "row": number},
        )

    buffer = bytearray()
    number = 0
    scan_from = 0
    while piece := fh.read(PIECE_BYTES):
        buffer += piece
        start = 0
        while (end := buffer.find(b"\n", max(start, scan_from))) >= 0:
            if end - start > MAX_LINE_BYTES:
                raise too_long(number)
            yield number, bytes(buffer[start:end])
            number += 1
            start = end + 1
        del buffer[:start]
        scan_from = len(buffer)
        if len(buffer) > MAX_LINE_BYTES:
            raise too_long(number)
    if buffer:
        yield number, bytes(buffer)


def _text_lines(fh: IO[bytes], what: str) -> Iterator[tuple[int, str]]:
    """(0-based line number, text) of the file's non-blank lines, decoded as UTF-8."""
    for number, raw in _lines(fh, what):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if number == 0 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if not line.strip():
            continue
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SourceRowError(
                f"{what} line {number + 1} (row {number}) is not UTF-8 text (byte {exc.start} of the line: "
                f"{line[exc.start : exc.start + 4]!r}); save the file as UTF-8",
                detail={"field": "source.format", "row": number},
            ) from None


def jsonl_value(
    line: str, field: str, where: str, row: int | None = None
) -> tuple[str | None, tuple[int, ...] | None]:
    """The sequence of one JSONL line: its ``field``, a text or token ids (``where`` names the
    line in errors; ``row`` goes into their detail when known)."""

    def detail(name: str) -> dict[str, object]:
        return {"field": name} if row is None else {"field": name, "row": row}

    try:
        record = json.loads(line)
    except ValueError as exc:
        raise SourceRowError(
            f"{where} is not JSON ({exc}): a JSONL file holds one JSON object per line",
            detail=detail("source.format"),
        ) from None
    if not isinstance(record, dict):
        raise SourceRowError(
            f"{where} is a JSON {type(record).__name__}, not an object: a JSONL file holds one JSON "
            f'object per line, e.g. {{"{field}": "..."}}',
            detail=detail("source.format"),
        )
    if field not in record:
        fields = ", ".join(repr(k) for k in list(record)[:20]) or "none"
        raise SourceRowError(
            f"{where} has no field {field!r} (its fields: {fields}); set source.field to the field "
            "that holds the text or token ids",
            detail=detail("source.field"),
        )
    return row_value(record[field], f"{where}, field {field!r}", row)


def _jsonl_rows(fh: IO[bytes], field: str, what: str) -> Iterator[RawRow]:
    for number, line in _text_lines(fh, what):
        text, ids = jsonl_value(line, field, f"{what} line {number + 1} (row {number})", number)
        yield number, text, ids


def open_parquet(fh: IO[bytes], column: str, what: str) -> Any:
    """``fh`` as a ``pyarrow.parquet.ParquetFile`` holding ``column`` (else a SourceRowError
    naming the problem: not Parquet, or the columns there are)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(fh)
    except pa.ArrowException as exc:
        raise SourceRowError(
            f"{what} is not a readable Parquet file ({exc}); check source.format",
            detail={"field": "source.format"},
        ) from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise SourceRowError(
            f"{what} has no column {column!r}; its columns: {', '.join(repr(n) for n in names)}; set "
            "source.field to the column that holds the text or token ids",
            detail={"field": "source.field"},
        )
    return parquet


def _parquet_rows(fh: IO[bytes], column: str, what: str) -> Iterator[RawRow]:
    import pyarrow as pa

    parquet = open_parquet(fh, column, what)
    row = 0
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except pa.ArrowException as exc:
            raise SourceRowError(
                f"{what}: reading the rows from row {row} failed ({exc})",
                detail={"field": "source", "row": row},
            ) from None
        for value in batch.column(0).to_pylist():
            text, ids = row_value(value, f"{what} row {row}, column {column!r}", row)
            yield row, text, ids
            row += 1
