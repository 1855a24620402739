"""Source files of bulk jobs: :func:`upload_file` streams a file to ``POST /v1/uploads``
(:meth:`qkvault.Client.upload`), :func:`with_file_source` points a job spec at the upload
(``qkvault submit spec.json --prompts-file data.jsonl``). docs/bulk-jobs.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from qkvault.errors import QkvaultClientError

if TYPE_CHECKING:
    from qkvault.client import Client

__all__ = ["FORMATS", "file_format", "upload_file", "with_file_source"]

PIECE_BYTES = 1 << 20
FORMATS = ("jsonl", "parquet", "text")
_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
}
# what a spec's source may keep when --prompts-file fills in its file (spec: storage/sources/spec.py)
_SOURCE_OPTIONS = ("offset", "limit", "shuffle_seed", "shuffle_buffer", "token_budget", "max_sequences")


def upload_file(client: Client, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Stream the file at ``path`` to ``POST /v1/uploads`` in pieces (never read whole) and return
    the upload: ``{"id", "state", "nbytes", "sha256", "filename", "created_at", "links"}``."""
    file = Path(path)
    try:
        handle = file.open("rb")
        size = os.fstat(handle.fileno()).st_size
    except OSError as exc:
        raise QkvaultClientError(f"cannot read {file}: {exc}") from exc

    def pieces() -> Iterator[bytes]:
        with handle:
            while piece := handle.read(PIECE_BYTES):
                yield piece

    what = "POST /v1/uploads"
    headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
    try:
        response = client._http().post(
            "/v1/uploads", content=pieces(), params={"filename": file.name}, headers=headers
        )
    except httpx.HTTPError as exc:
        raise client._unreachable(exc, what) from exc
    finally:
        handle.close()
    if response.status_code >= 400:
        raise client._error(response)
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, Mapping) or not isinstance(body.get("id"), str):
        raise QkvaultClientError(f"unexpected answer from {what}: {response.text[:200]}")
    return dict(body)


def file_format(path: str | os.PathLike[str], given: str | None = None) -> str:
    """``given``, else the format of ``path``'s extension (.jsonl/.ndjson, .parquet/.pq, .txt/.text)."""
    if given is not None:
        if given not in FORMATS:
            raise QkvaultClientError(f"unknown file format {given!r}: use one of {', '.join(FORMATS)}")
        return given
    suffix = Path(path).suffix.lower()
    if suffix not in _BY_SUFFIX:
        raise QkvaultClientError(
            f"cannot tell the format of {os.fspath(path)} from its extension {suffix or '(none)'!r}: pass "
            f"--format ({', '.join(FORMATS)})"
        )
    return _BY_SUFFIX[suffix]


def _file_source(spec: Mapping[str, Any], fmt: str, field: str | None) -> dict[str, Any]:
    """The spec's ``source`` options to keep (offset, limit, shuffle, batching), checked."""
    if spec.get("prompts") is not None:
        raise QkvaultClientError(
            "the spec has inline prompts and --prompts-file gives a file of prompts: a job has one or the "
            "other; remove prompts from the spec"
        )
    source = spec.get("source") or {}
    if not isinstance(source, Mapping):
        raise QkvaultClientError("the spec's source must be a JSON object")
    if source.get("kind", "file") != "file":
        raise QkvaultClientError(
            f"the spec's source is of kind {source.get('kind')!r} and --prompts-file gives a file: remove "
            "the source from the spec, or keep only its options (offset, limit, shuffle_seed, ...)"
        )
    if field is not None and fmt == "text":
        raise QkvaultClientError(
            "--field is for jsonl and parquet files: a text file has one prompt per line"
        )
    return {k: v for k, v in source.items() if k in _SOURCE_OPTIONS}


def with_file_source(
    client: Client,
    spec: Mapping[str, Any],
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    field: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upload ``path`` and return ``(spec with source = the upload, the upload)``. The spec's own
    ``source`` options (offset, limit, shuffle, batching) are kept; a spec with inline ``prompts``
    or another kind of source is refused before anything is uploaded."""
    fmt = file_format(path, fmt)
    options = _file_source(spec, fmt, field)
    if field is None and fmt != "text":
        field = (spec.get("source") or {}).get("field")
    upload = upload_file(client, path)
    source: dict[str, Any] = {"kind": "file", "upload": upload["id"], "format": fmt, **options}
    if field is not None:
        source["field"] = field
    return {**{k: v for k, v in spec.items() if k != "prompts"}, "source": source}, upload
