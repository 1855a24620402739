"""Uploaded files of bulk jobs' sources (``POST /v1/uploads``), kept in the object store.

Layout, decided in one place (:meth:`ObjectStore.upload_url`)::

    <store root>/uploads/<owner>/<upload id>/data          the file, byte for byte
    <store root>/uploads/<owner>/<upload id>/upload.json   its record (UploadRecord)

The owner is part of the key: a job's ``file`` source looks its upload up under the job's owner,
so a job never reads another owner's file. An upload streamed through the API goes through
:class:`UploadSink`: each piece is written as it arrives (never the whole file in memory), counted
and hashed; ``data`` appears only when the file is complete (a local file is renamed into place, an
S3 multipart upload is completed; a failed or oversized upload is removed or aborted), then the
record. A presigned upload (S3) writes its record first (``nbytes`` unknown) and ``data`` appears
when the client's PUT completes; :func:`read_upload` then reports the object's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from storage.errors import QkvaultError, StoreError
from storage.stores.objectstore import ObjectStore, not_writable

__all__ = [
    "UPLOAD_DATA",
    "UPLOAD_ID_PATTERN",
    "UPLOAD_RECORD",
    "UploadRecord",
    "UploadSink",
    "UploadTooLarge",
    "delete_upload",
    "new_upload_id",
    "open_upload",
    "presign_upload",
    "read_upload",
]

UPLOAD_DATA = "data"
UPLOAD_RECORD = "upload.json"
UPLOAD_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # as a job's source.upload
S3_BLOCK_BYTES = 8 << 20  # S3 multipart part size (at least 5 MiB): what one upload buffers at most


class UploadTooLarge(QkvaultError):
    """An upload past the server's limit (``detail``: limit, setting)."""

    problem_type = "upload-too-large"
    status = 413


@dataclass(frozen=True)
class UploadRecord:
    """One upload: ``nbytes`` and ``sha256`` are None while a presigned upload has not arrived
    (``sha256`` stays None for presigned uploads: the server never sees their bytes)."""

    id: str
    owner: str
    created_at: datetime
    nbytes: int | None = None
    sha256: str | None = None
    filename: str | None = None
    presigned: bool = False
    expires_at: datetime | None = None  # a presigned upload's URL stops working then

    @property
    def complete(self) -> bool:
        return self.nbytes is not None

    def to_json(self) -> bytes:
        data = asdict(self)
        for key in ("created_at", "expires_at"):
            data[key] = data[key].isoformat() if data[key] is not None else None
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> UploadRecord:
        data: dict[str, Any] = json.loads(raw)
        for key in ("created_at", "expires_at"):
            if data.get(key) is not None:
                data[key] = datetime.fromisoformat(data[key])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def new_upload_id() -> str:
    return uuid.uuid4().hex


def _path(store: ObjectStore, url: str, relpath: str) -> str:
    return f"{store._path(url).rstrip('/')}/{relpath}"


def _store_error(exc: OSError, url: str, operation: str) -> StoreError:
    """A store error of an upload: StoreNotWritable when an operator can fix it, else StoreError."""
    fixable = not_writable(exc, url, operation)
    return fixable or StoreError(f"object store: cannot {operation} in {url}: {type(exc).__name__}: {exc}")


def _write_small(store: ObjectStore, url: str, relpath: str, data: bytes) -> None:
    """Write a small object whole (a local file atomically: written aside, then renamed)."""
    path = _path(store, url, relpath)
    try:
        if store.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            aside = f"{path}.tmp-{secrets.token_hex(4)}"
            with open(aside, "wb") as fh:
                fh.write(data)
            os.replace(aside, path)
        else:
            store.fs().pipe_file(path, data)
    except OSError as exc:
        raise _store_error(exc, url, f"write {relpath}") from exc


class UploadSink:
    """Stream one upload into the store: :meth:`write` each piece, then :meth:`commit` (or
    :meth:`abort`). Past ``max_bytes`` a write aborts the upload and raises :class:`UploadTooLarge`
    (``limit_setting`` names the setting in the message)."""

    def __init__(
        self,
        store: ObjectStore,
        owner: str,
        upload_id: str,
        *,
        max_bytes: int,
        limit_setting: str = "QKVAULT_MAX_UPLOAD_BYTES",
        filename: str | None = None,
    ) -> None:
        self.store, self.owner, self.id = store, owner, upload_id
        self.url = store.upload_url(owner, upload_id)
        self.max_bytes, self.limit_setting, self.filename = max_bytes, limit_setting, filename
        self.nbytes = 0
        self._hash = hashlib.sha256()
        self._target = _path(store, self.url, UPLOAD_DATA)
        self._done = False
        try:
            if store.is_local:
                os.makedirs(os.path.dirname(self._target), exist_ok=True)
                self._aside = f"{self._target}.partial-{secrets.token_hex(4)}"
                self._fh: IO[bytes] = open(self._aside, "xb")  # noqa: SIM115 - closed by commit/abort
            else:
                self._fh = store.fs().open(self._target, "wb", block_size=S3_BLOCK_BYTES)
        except OSError as exc:
            raise _store_error(exc, self.url, "create the upload") from exc

    def write(self, piece: bytes) -> None:
        if self.nbytes + len(piece) > self.max_bytes:
            self.abort()
            raise UploadTooLarge(
                f"upload larger than this server's limit of {self.max_bytes} bytes ({self.limit_setting}); "
                "split the file, or ask the operator to raise the limit",
                detail={"limit": self.max_bytes, "setting": self.limit_setting},
            )
        self.nbytes += len(piece)
        self._hash.update(piece)
        try:
            self._fh.write(piece)
        except OSError as exc:
            self.abort()
            raise _store_error(exc, self.url, "write the upload") from exc

    def commit(self) -> UploadRecord:
        """Put ``data`` in place, then the record; returns the record."""
        try:
            self._fh.close()
            if self.store.is_local:
                os.replace(self._aside, self._target)
        except OSError as exc:
            self.abort()
            raise _store_error(exc, self.url, "complete the upload") from exc
        self._done = True
        record = UploadRecord(
            id=self.id,
            owner=self.owner,
            created_at=datetime.now(UTC),
            nbytes=self.nbytes,
            sha256=self._hash.hexdigest(),
            filename=self.filename,
        )
        try:
            _write_small(self.store, self.url, UPLOAD_RECORD, record.to_json())
        except StoreError:
            with contextlib.suppress(OSError):  # no data without its record
                self.store.delete_tree(self.url)
            raise
        return record

    def abort(self) -> None:
        """Drop what was written (an S3 multipart upload is aborted, never completed)."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            if self.store.is_local:
                self._fh.close()
                os.unlink(self._aside)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self._target))
            else:
                discard = getattr(self._fh, "discard", None)
                if discard is not None:
                    discard()
                    self._fh.closed = True  # type: ignore[misc]  # s3fs: close() would commit
                else:  # pragma: no cover - every S3 file object of s3fs has discard()
                    self._fh.close()


def read_upload(store: ObjectStore, owner: str, upload_id: str) -> UploadRecord | None:
    """The record of ``owner``'s upload ``upload_id`` (a presigned one with the size of its data
    once it arrived), or None when this owner has no such upload."""
    url = store.upload_url(owner, upload_id)
    try:
        record = UploadRecord.from_json(store.read_bytes(url, UPLOAD_RECORD))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _store_error(exc, url, f"read {UPLOAD_RECORD}") from exc
    except (ValueError, TypeError) as exc:
        raise StoreError(f"upload record {url}/{UPLOAD_RECORD} is unreadable: {exc}") from exc
    if record.complete or not record.presigned:
        return record
    try:
        info = store.fs().info(_path(store, url, UPLOAD_DATA), refresh=True)  # PUT by the client
    except FileNotFoundError:
        return record  # the client has not PUT the file (yet)
    except OSError as exc:
        raise _store_error(exc, url, f"read {UPLOAD_DATA}") from exc
    return replace(record, nbytes=int(info.get("size") or 0))


def open_upload(store: ObjectStore, owner: str, upload_id: str) -> IO[bytes]:
    """The data of ``owner``'s upload, for reading (FileNotFoundError when there is none). On S3 it
    is read ahead ``S3_BLOCK_BYTES`` at a time (s3fs's default, 50 MiB, would fetch that much to
    sample a few rows)."""
    url = store.upload_url(owner, upload_id)
    if store.is_local:
        return store.open_file(url, UPLOAD_DATA)
    handle: IO[bytes] = store.fs().open(_path(store, url, UPLOAD_DATA), "rb", block_size=S3_BLOCK_BYTES)
    return handle


def presign_upload(
    store: ObjectStore,
    owner: str,
    upload_id: str,
    expires_s: int,
    *,
    endpoint_url: str | None = None,
    filename: str | None = None,
) -> tuple[UploadRecord, str]:
    """Record a presigned upload (S3 stores) and return it with its presigned PUT URL: a plain
    ``PUT`` of the file's bytes to the URL, before it expires, completes the upload."""
    url = store.upload_url(owner, upload_id)
    now = datetime.now(UTC)
    (put_url,) = store.presigned_urls(url, [UPLOAD_DATA], expires_s, endpoint_url=endpoint_url, method="PUT")
    record = UploadRecord(
        id=upload_id,
        owner=owner,
        created_at=now,
        filename=filename,
        presigned=True,
        expires_at=now + timedelta(seconds=expires_s),
    )
    _write_small(store, url, UPLOAD_RECORD, record.to_json())
    return record, put_url


def delete_upload(store: ObjectStore, owner: str, upload_id: str) -> bool:
    """Remove ``owner``'s upload; False when there was none."""
    url = store.upload_url(owner, upload_id)
    if not store.exists(url, UPLOAD_RECORD):
        return False
    try:
        store.delete_tree(url)
    except OSError as exc:
        raise _store_error(exc, url, "delete the upload") from exc
    return True
