"""Opaque keyset cursors for ``Index.list_jobs`` (newest first: created_at desc, id desc)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime

from storage.index.records import JobRecord


def encode_cursor(last: JobRecord) -> str:
    raw = json.dumps([last.created_at.isoformat(), last.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        created_at = datetime.fromisoformat(created)
        if created_at.tzinfo is None or not isinstance(job_id, str):
            raise ValueError("malformed")
    except (binascii.Error, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise ValueError(
            f"invalid cursor {cursor[:64]!r}: pass the next cursor returned by the previous page"
        ) from exc
    return created_at, job_id
