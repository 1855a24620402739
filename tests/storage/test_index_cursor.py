"""Cursors of ``Index.list_jobs`` come from clients: anything but a cursor the index wrote is a
``ValueError`` (the API's 400 ``invalid-cursor``), on SQLite and PostgreSQL alike."""

from __future__ import annotations

import base64
import json

import pytest

from storage.index import Index


def _cursor(*items: object) -> str:
    raw = json.dumps(list(items)).encode()  # ensure_ascii: a lone surrogate travels as \ud800
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


@pytest.mark.parametrize(
    "cursor",
    [
        # 0001-01-01 at +01:00 is before datetime.min in UTC: OverflowError when bound (a 500 before)
        _cursor("0001-01-01T00:00:00+01:00", "x"),
        _cursor("9999-12-31T23:59:59-01:00", "x"),
        _cursor("2030-01-02T03:04:05+00:00", "a\ud800b"),  # UTF-8 cannot encode it
        _cursor("2030-01-02T03:04:05+00:00", "a\x00b"),  # PostgreSQL refuses NUL in text
        _cursor("2030-01-02T03:04:05+00:00", 7),
        base64.urlsafe_b64encode(b"[" * 5000).decode(),  # nested past the recursion limit
    ],
    ids=["before-min", "after-max", "surrogate-id", "nul-id", "int-id", "deep"],
)
def test_list_jobs_refuses_cursors_it_cannot_bind(index: Index, cursor: str) -> None:
    with pytest.raises(ValueError, match="invalid cursor"):
        index.list_jobs(owner="alice", cursor=cursor)
