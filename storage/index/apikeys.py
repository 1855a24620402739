"""API keys of the REST API, kept in the index database (table ``api_keys``).

A key is ``qk_`` + 43 URL-safe characters (256 random bits). The database holds only its sha256
(hex) and the first characters (``prefix``, to recognise a key in listings); the secret is shown
once, when the key is created. A request is authenticated by hashing the presented secret and
looking the hash up, so no comparison of secrets ever happens (and none needs to be constant-time):
a slow password hash buys nothing for 256-bit random secrets.

    keys = ApiKeys(index)
    secret, record = keys.create(owner="alice", admin=False, label="laptop")
    keys.authenticate(secret)      # -> record, or None for an unknown or revoked key
    keys.revoke(record.id)

Owners are plain names (the ``owner`` of jobs): a user may hold several keys; revoking one leaves
the others and the user's jobs alone. Imports neither fastapi nor torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.errors import QkvaultError
from storage.index.models import ApiKeyRow, utcnow
from storage.index.repo import Index
from storage.index.retry import retried

KEY_PREFIX = "qk_"
PREFIX_CHARS = 12  # "qk_" + 9 characters of the secret are stored, to tell keys apart
MAX_KEY_CHARS = 128  # longer bearer tokens are refused before hashing
OWNER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,254}")


class ApiKeyNotFound(QkvaultError, LookupError):
    problem_type = "api-key-not-found"
    status = 404


@dataclass(frozen=True)
class ApiKeyRecord:
    """One row of ``api_keys`` without the hash (nothing secret)."""

    id: str
    owner: str
    admin: bool
    label: str | None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def role(self) -> str:
        return "admin" if self.admin else "user"


def hash_key(secret: str) -> str:
    """The stored form of a key: sha256 of its UTF-8 text, hex."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def looks_like_key(secret: str) -> bool:
    return secret.startswith(KEY_PREFIX) and len(secret) <= MAX_KEY_CHARS and secret.isascii()


def check_owner(owner: str) -> str:
    if not OWNER_RE.fullmatch(owner):
        raise ValueError(
            f"invalid owner {owner!r}: use 1-255 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return owner


def _record(row: ApiKeyRow) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row.id,
        owner=row.owner,
        admin=row.admin,
        label=row.label,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )


class ApiKeys:
    """Create, list, revoke and check API keys in the index database of ``index``."""

    def __init__(self, index: Index) -> None:
        self.index = index

    def create(
        self, *, owner: str, admin: bool = False, label: str | None = None
    ) -> tuple[str, ApiKeyRecord]:
        """A new key for ``owner``: ``(secret, record)``. The secret is not stored and cannot be
        shown again."""
        check_owner(owner)
        if label is not None and len(label) > 255:
            raise ValueError("label must be at most 255 characters")
        secret, key_id = new_secret(), secrets.token_hex(8)

        def work(session: Session) -> ApiKeyRecord:
            if retried(session) and (mine := session.get(ApiKeyRow, key_id)) is not None:
                return _record(mine)  # the first try's COMMIT landed
            row = ApiKeyRow(
                id=key_id,
                owner=owner,
                admin=admin,
                label=label,
                key_hash=hash_key(secret),
                prefix=secret[:PREFIX_CHARS],
                created_at=utcnow(),
                revoked_at=None,
            )
            session.add(row)
            session.flush()
            return _record(row)

        return secret, self.index.transact(work, write=True)

    def authenticate(self, secret: str) -> ApiKeyRecord | None:
        """The key's record when ``secret`` is a key that exists and is not revoked, else None."""
        if not looks_like_key(secret):
            return None
        stmt = select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_key(secret), ApiKeyRow.revoked_at.is_(None))
        row = self.index.transact(lambda session: session.scalars(stmt).one_or_none())
        return None if row is None else _record(row)

    def get(self, key_id: str) -> ApiKeyRecord:
        row = self.index.transact(lambda session: session.get(ApiKeyRow, key_id))
        if row is None:
            raise _not_found(key_id)
        return _record(row)

    def list(self, *, owner: str | None = None, include_revoked: bool = False) -> list[ApiKeyRecord]:
        """Keys, oldest first (optionally of one owner; revoked ones only when asked)."""
        stmt = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
        if owner is not None:
            stmt = stmt.where(ApiKeyRow.owner == owner)
        if not include_revoked:
            stmt = stmt.where(ApiKeyRow.revoked_at.is_(None))
        return self.index.transact(lambda session: [_record(row) for row in session.scalars(stmt)])

    def revoke(self, key_id: str) -> ApiKeyRecord:
        """Revoke a key (at once: the next request with it gets 401). Revoking twice is a no-op."""

        def work(session: Session) -> ApiKeyRecord:
            row = session.scalars(
                select(ApiKeyRow).where(ApiKeyRow.id == key_id).with_for_update()
            ).one_or_none()
            if row is None:
                raise _not_found(key_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return _record(row)

        return self.index.transact(work, write=True)

    def ensure_key_file(self, path: Path, *, owner: str, label: str = "embedded") -> tuple[str, bool]:
        """The key kept in ``path`` (mode 0600) when it still authenticates, else a new key written
        there. Returns ``(secret, created)``. Used by the embedded stack (``qkvault up``)."""
        try:
            secret = path.read_text().strip()
        except OSError:
            secret = ""
        if secret and (found := self.authenticate(secret)) is not None and found.owner == owner:
            return secret, False
        secret, _ = self.create(owner=owner, label=label)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        os.replace(tmp, path)
        return secret, True


def _not_found(key_id: str) -> ApiKeyNotFound:
    return ApiKeyNotFound(
        f"API key {key_id} not found: list key ids with `qkvault keys list --all`", detail={"key_id": key_id}
    )
