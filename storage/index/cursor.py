"""Opaque keyset cursors for ``Index.list_jobs`` (newest first: created_at desc, id desc).

A cursor comes back from a client, so it is decoded defensively: whatever it holds, a cursor this
module did not write is a ``ValueError`` (the API's 400 ``invalid-cursor``), never an error of the
database binding (a time out of range once it is converted to UTC, text UTF-8 or PostgreSQL cannot
take).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

from storage.index.records import JobRecord


def encode_cursor(last: JobRecord) -> str:
    raw = json.dumps([last.created_at.isoformat(), last.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """``(created_at in UTC, job id)`` of a cursor from :func:`encode_cursor`; ``ValueError`` otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None or not isinstance(job_id, str) or "\x00" in job_id:
            raise ValueError("malformed")
        created_at = created_at.astimezone(UTC)  # OverflowError past datetime's range in UTC
        job_id.encode("utf-8")  # UnicodeEncodeError: a lone surrogate
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # binascii, Unicode: ValueError
        raise ValueError(
            f"invalid cursor {cursor[:64]!r}: pass the next cursor returned by the previous page"
        ) from exc
    return created_at, job_id
