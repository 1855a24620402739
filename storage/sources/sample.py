"""A sample of a bulk job's source, read before any GPU time: how many sequences the job will
export and a spread of its rows to measure their lengths (docs/bulk-jobs.md, "Limits").

- inline ``prompts`` / ``token_ids``: the count is exact; at most ``rows`` rows, evenly strided;
- ``parquet`` files: the count is exact (the file's metadata); rows from up to
  :data:`WINDOWS` row groups spread over the file;
- ``jsonl`` / ``text`` files: a file of at most :data:`WHOLE_FILE_BYTES` is read whole (exact
  count); a larger one is read in :data:`WINDOWS` windows centred in equal parts of the file, and
  its row count is its size divided by the windows' bytes per row (estimated);
- ``dataset``: the first ``rows`` rows (a streamed dataset cannot be read at an offset); the count
  from the split's ``num_examples`` when the dataset records it, else unknown.

``offset`` and ``limit`` apply to the count; the sample is taken from the whole source (lengths in
a file are assumed not to depend on where the selection starts).
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass
from typing import IO, Any

from storage.sources.readers import file_field, jsonl_value, open_parquet, read_rows
from storage.sources.rows import SourceContext, SourceRowError, row_value
from storage.sources.spec import DatasetSource, FileSource, PromptsSource, SourceSpec, TokenIdsSource

__all__ = ["DEFAULT_SAMPLE_ROWS", "SampledRow", "SourceSample", "sample_source"]

DEFAULT_SAMPLE_ROWS = 1000
WINDOWS = 16
WHOLE_FILE_BYTES = 4 << 20
WINDOW_BYTES = 256 << 10  # read at each window (rows longer than this are sampled whole-line only)
MAX_WINDOW_BYTES = 64 << 20  # a window grows until it holds a row, up to this

SampledRow = tuple[str | None, tuple[int, ...] | None]  # (text, token ids)


@dataclass(frozen=True)
class SourceSample:
    """``rows``: the sampled rows; ``sequences``: how many the job exports (offset and limit
    applied), exact when ``exact``, else an estimate (None: unknown); ``how``: in words."""

    rows: list[SampledRow]
    sequences: int | None
    exact: bool
    how: str


def _selected(total: int, source: SourceSpec) -> int:
    left = max(0, total - source.offset)
    return left if source.limit is None else min(left, source.limit)


def _strided(values: list[Any], rows: int) -> list[Any]:
    if len(values) <= rows:
        return list(values)
    step = len(values) / rows
    return [values[int(i * step)] for i in range(rows)]


def sample_source(
    source: SourceSpec, context: SourceContext, rows: int = DEFAULT_SAMPLE_ROWS
) -> SourceSample:
    """Sample ``source`` (module docstring). Raises :class:`SourceRowError` for a sampled row that
    cannot be a sequence, naming where it is."""
    if isinstance(source, PromptsSource):
        total = len(source.prompts)
        picked: list[SampledRow] = [(p, None) for p in _strided(source.prompts, rows)]
        return SourceSample(picked, _selected(total, source), True, f"{total:,} inline prompts")
    if isinstance(source, TokenIdsSource):
        total = len(source.token_ids)
        picked = [(None, tuple(ids)) for ids in _strided(source.token_ids, rows)]
        return SourceSample(picked, _selected(total, source), True, f"{total:,} inline token-id sequences")
    if isinstance(source, DatasetSource):
        return _dataset_sample(source, context, rows)
    return _file_sample(source, context, rows)


def _dataset_sample(source: DatasetSource, context: SourceContext, rows: int) -> SourceSample:
    from storage.sources.hfdatasets import dataset_folder, split_rows

    raw = read_rows(source, context)
    try:
        picked = [(text, ids) for _, text, ids in itertools.islice(raw, rows)]
    finally:
        raw.close()
    total = split_rows(source, dataset_folder(source, context.datasets_dir))
    if total is None:
        if len(picked) < rows:  # the whole split was read
            total = len(picked)
        else:
            how = f"the first {len(picked):,} rows; the split's size is not recorded"
            return SourceSample(picked, None, False, how)
    return SourceSample(picked, _selected(total, source), True, f"{total:,} rows (the split's info)")


def _file_sample(source: FileSource, context: SourceContext, rows: int) -> SourceSample:
    if context.store is None or context.owner is None:
        raise SourceRowError("sampling a file source needs the object store and the job's owner")
    from storage.stores.uploads import open_upload

    try:
        fh = open_upload(context.store, context.owner, source.upload)
    except FileNotFoundError:
        raise SourceRowError(
            f"upload {source.upload!r} not found; upload the file with POST /v1/uploads first",
            detail={"field": "source.upload"},
        ) from None
    with fh:
        if source.format == "parquet":
            return _parquet_sample(fh, source, rows)
        size = fh.seek(0, io.SEEK_END)
        fh.seek(0)
        if size <= WHOLE_FILE_BYTES:
            return _whole_file(source, context, rows)
        return _windows(fh, size, source, rows)


def _whole_file(source: FileSource, context: SourceContext, rows: int) -> SourceSample:
    every = [(text, ids) for _, text, ids in read_rows(source, context)]
    return SourceSample(_strided(every, rows), _selected(len(every), source), True, f"{len(every):,} rows")


def _parquet_sample(fh: IO[bytes], source: FileSource, rows: int) -> SourceSample:
    what, column = f"upload {source.upload} (parquet)", file_field(source)
    parquet = open_parquet(fh, column, what)
    total, groups = parquet.metadata.num_rows, parquet.metadata.num_row_groups
    spread = min(WINDOWS, groups)
    chosen = [i * groups // spread for i in range(spread)]  # row groups spread over the file
    per_group = max(1, -(-rows // max(1, len(chosen))))
    picked: list[SampledRow] = []
    for group in chosen:
        first_row = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
        batches = parquet.iter_batches(batch_size=per_group, row_groups=[group], columns=[column])
        batch = next(batches, None)
        values = [] if batch is None else batch.column(0).to_pylist()
        for i, value in enumerate(values):
            row = first_row + i
            picked.append(row_value(value, f"{what} row {row}, column {column!r}", row))
    return SourceSample(picked, _selected(total, source), True, f"{total:,} rows (Parquet metadata)")


def _window_lines(fh: IO[bytes], start: int, size: int) -> tuple[list[tuple[int, bytes]], int]:
    """Whole lines read from byte ``start`` (a partial first line dropped unless ``start`` is 0):
    ``[(byte offset, line)]`` and the bytes they span (line ends included)."""
    fh.seek(start)
    want = WINDOW_BYTES
    while True:
        data = fh.read(want)
        skip = 0
        if start > 0:
            newline = data.find(b"\n")
            skip = newline + 1 if newline >= 0 else len(data)
        end = data.rfind(b"\n")
        at_eof = start + len(data) >= size
        if at_eof and end < len(data) - 1:
            end = len(data)  # the file's last line has no line end
        if end >= skip or at_eof or want >= MAX_WINDOW_BYTES:
            break
        want *= 4
        fh.seek(start)
    lines, offset = [], skip
    for line in data[skip : max(skip, end)].split(b"\n"):
        lines.append((start + offset, line))
        offset += len(line) + 1
    return lines, max(0, end + 1 - skip)


def _parse_line(source: FileSource, line: bytes, where: str) -> SampledRow | None:
    """One line as the readers parse it (None: a blank line, which is no row)."""
    line = line.removesuffix(b"\r").removeprefix(b"\xef\xbb\xbf")
    if not line.strip():
        return None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise SourceRowError(
            f"{where} is not UTF-8 text; save the file as UTF-8", detail={"field": "source.format"}
        ) from None
    if source.format == "text":
        return row_value(text, where)
    return jsonl_value(text, file_field(source), where)


def _windows(fh: IO[bytes], size: int, source: FileSource, rows: int) -> SourceSample:
    """Rows from :data:`WINDOWS` windows, each centred in an equal part of the file. A part holds
    about (its bytes × the window's rows per byte) rows, so each window gives that share of the
    sample: the sample is spread over rows, not bytes (long rows are not over-represented)."""
    what = f"upload {source.upload} ({source.format})"
    windows: list[tuple[list[tuple[int, bytes]], float]] = []
    for k in range(WINDOWS):
        lines, nbytes = _window_lines(fh, (2 * k + 1) * size // (2 * WINDOWS), size)
        rows_here = [item for item in lines if item[1].strip()]  # a blank line is no row
        windows.append((rows_here, len(rows_here) / max(1, nbytes)))
    density = sum(d for _, d in windows) / WINDOWS  # rows per byte of the file
    if density == 0:
        raise SourceRowError(f"{what} has no rows in its sampled windows", detail={"field": "source"})
    picked: list[SampledRow] = []
    for rows_here, d in windows:
        for offset, line in rows_here[: round(rows * d / density / WINDOWS)]:
            parsed = _parse_line(source, line, f"{what}: the line at byte {offset:,}")
            if parsed is not None:
                picked.append(parsed)
    total = round(size * density)
    how = f"≈{total:,} rows ({size:,} bytes at {1 / density:,.0f} bytes a row, {WINDOWS} windows)"
    return SourceSample(picked, _selected(total, source), False, how)
