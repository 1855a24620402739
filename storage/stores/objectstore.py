"""Object stores that hold bundles: a local directory or S3 (through s3fs).

A bundle is addressed by URL: a local path (``/data/store/jobs/<id>.zarr``) or
``s3://bucket/prefix/jobs/<id>.zarr``. Clients are built lazily, so a Celery prefork child never
inherits an event loop or connection pool from its parent.

Writes to S3 are retried with backoff for a bounded time (:class:`StoreRetry`, on top of botocore's
and s3fs's own few retries): a 5xx, a refused or reset connection, a timeout. Past the budget the
operation raises :class:`~storage.errors.StoreUnavailable` (the job is queued again while attempts
are left). Objects are whole: an S3 PUT is atomic, so a failed write leaves no torn chunk.

A store that refuses writes for a reason an operator can fix (disk full or over quota, read-only,
permission denied) is not retried here: :func:`not_writable` turns the error into
:class:`~storage.errors.StoreNotWritable`, naming the resource and the fix (the job is queued
again while attempts are left, so it resumes once the operator fixed it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from storage.errors import StoreError, StoreNotWritable, StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

S3_SCHEME = "s3://"


def _strip_file_scheme(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def is_s3(url: str) -> bool:
    return url.startswith(S3_SCHEME)


@dataclass
class ObjectStore:
    """Root of the bundle store. ``storage_options`` are passed to s3fs for ``s3://`` roots."""

    root_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    _fs: Any = field(default=None, init=False, repr=False)
    _sign_fs: Any = field(default=None, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: Any) -> ObjectStore:
        root = settings.store_url
        if not is_s3(root):
            root = str(Path(_strip_file_scheme(root)).expanduser().resolve())
        return cls(root_url=root, storage_options=settings.storage_options())

    @property
    def is_local(self) -> bool:
        return not is_s3(self.root_url)

    def bundle_url(self, job_id: str) -> str:
        """Where the Zarr group of ``job_id`` lives."""
        return f"{self.root_url.rstrip('/')}/jobs/{job_id}.zarr"

    def upload_url(self, owner: str, upload_id: str) -> str:
        """Where upload ``upload_id`` of ``owner`` lives (a bulk job's source file): a folder holding
        ``data`` (the file) and ``upload.json`` (its record), :mod:`storage.stores.uploads`. The
        owner is part of the key, so a job reads only its own owner's uploads."""
        return f"{self.root_url.rstrip('/')}/uploads/{owner}/{upload_id}"

    # -- filesystem access (sync; for listing, zipping, verifying) --------------------------------
    def fs(self) -> Any:
        """A synchronous fsspec filesystem for this store (s3fs or the local filesystem)."""
        if self._fs is None:
            if self.is_local:
                from fsspec.implementations.local import LocalFileSystem

                self._fs = LocalFileSystem()
            else:
                import s3fs

                self._fs = s3fs.S3FileSystem(**self.storage_options)
        return self._fs

    def _path(self, url: str) -> str:
        return url[len(S3_SCHEME) :] if is_s3(url) else _strip_file_scheme(url)

    def list_files(self, url: str) -> list[tuple[str, int]]:
        """Every file under ``url`` as ``(relative_path, size_bytes)``, sorted by path."""
        base = self._path(url).rstrip("/")
        try:
            found = self.fs().find(base, detail=True)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {url}: {exc}") from exc
        out = []
        for path, info in found.items():
            rel = path[len(base) :].lstrip("/") if path.startswith(base) else path
            out.append((rel, int(info.get("size") or 0)))
        return sorted(out)

    def open_file(self, url: str, relpath: str) -> IO[bytes]:
        return self.fs().open(f"{self._path(url).rstrip('/')}/{relpath}", "rb")

    def read_bytes(self, url: str, relpath: str) -> bytes:
        """One file read whole: on S3 a single GET (opening the file first asks for its size)."""
        return bytes(self.fs().cat_file(f"{self._path(url).rstrip('/')}/{relpath}"))

    def iter_file(self, url: str, relpath: str, piece_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Read one file in pieces of ``piece_bytes`` (1 MiB default) without holding it whole."""
        with self.open_file(url, relpath) as fh:
            while piece := fh.read(piece_bytes):
                yield piece

    def write_bytes(self, url: str, relpath: str, data: bytes) -> None:
        """Write one small file whole (made with its folders; replaced if it exists)."""
        path = f"{self._path(url).rstrip('/')}/{relpath}"
        with store_errors(url, "write"):
            if self.is_local:
                self.fs().makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            self.fs().pipe_file(path, data)

    def exists(self, url: str, relpath: str = "zarr.json") -> bool:
        return bool(self.fs().exists(f"{self._path(url).rstrip('/')}/{relpath}"))

    def _signer(self, endpoint_url: str | None) -> Any:
        """An s3fs filesystem that signs with SigV4 (s3fs/botocore presign with legacy SigV2 by
        default, which S3 refuses for new buckets and which has no upper bound on expiry)."""
        if self._sign_fs is None or self._sign_fs[0] != endpoint_url:
            import s3fs

            options = dict(self.storage_options)
            options["config_kwargs"] = {**options.get("config_kwargs", {}), "signature_version": "s3v4"}
            if endpoint_url:
                options["endpoint_url"] = endpoint_url
            self._sign_fs = (endpoint_url, s3fs.S3FileSystem(**options, skip_instance_cache=True))
        return self._sign_fs[1]

    def presigned_urls(
        self,
        url: str,
        relpaths: list[str],
        expires_s: int,
        *,
        endpoint_url: str | None = None,
        method: Literal["GET", "PUT"] = "GET",
    ) -> list[str]:
        """Presigned HTTPS GET URLs (S3 SigV4, valid ``expires_s`` seconds) of files under ``url``:
        anyone holding one can read that object until it expires, without credentials. Signing is
        local (no request to S3). ``endpoint_url``: the S3 endpoint as the URLs' users reach it,
        when it differs from the one this process uses (the host is part of the signature).
        ``method="PUT"``: URLs that write the object instead (an upload). Local stores have no such
        URLs: StoreError."""
        if self.is_local:
            raise StoreError(f"{url} is on a local disk: presigned URLs exist only for s3:// stores")
        from fsspec.asyn import sync

        fs = self._signer(endpoint_url)
        base = self._path(url).rstrip("/")

        async def sign_all() -> list[str]:
            import asyncio

            action = "put_object" if method == "PUT" else "get_object"
            signed = await asyncio.gather(
                *(fs._url(f"{base}/{rel}", expires=expires_s, client_method=action) for rel in relpaths)
            )
            return [str(u) for u in signed]

        try:
            result: list[str] = sync(fs.loop, sign_all)
        except OSError as exc:
            raise StoreError(f"cannot sign URLs under {url}: {exc}") from exc
        return result

    def delete_tree(self, url: str) -> None:
        path = self._path(url)
        if self.is_local:
            shutil.rmtree(path, ignore_errors=True)
        elif self.fs().exists(path):
            self.fs().rm(path, recursive=True)


@dataclass(frozen=True)
class StoreRetry:
    """Retry a failing store operation with exponential backoff (``first_delay_s`` doubling up to
    ``max_delay_s``) until ``deadline_s`` have passed since its first try; 0 disables retrying."""

    deadline_s: float = 60.0
    first_delay_s: float = 0.2
    max_delay_s: float = 5.0


_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def is_transient(exc: BaseException) -> bool:
    """A store error worth retrying: an I/O error that is not about the object itself (a 5xx is an
    ``OSError(EIO)`` from s3fs), a timeout, or a botocore/aiohttp connection error. Not one an
    operator must fix (:func:`not_writable`): retrying would not help until they do."""
    if isinstance(exc, StoreError):
        return False  # already retried below, or classified
    if isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE:
        return False
    if isinstance(exc, OSError | asyncio.TimeoutError | TimeoutError):
        return not isinstance(exc, _PERMANENT_OS_ERRORS)
    modules = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    return bool(modules & {"botocore", "aiobotocore", "aiohttp"})


# Store errors an operator can fix, by errno: what happened, and what to do ({mount}: the file
# system holding the resource, {dir}: the directory written, {uid}/{gid}: the worker's user)
_NOT_WRITABLE: dict[int, tuple[str, str]] = {
    errno.ENOSPC: (
        "no space left on device",
        "free space on {mount} ({free}) or make that file system larger",
    ),
    errno.EDQUOT: (
        "disk quota exceeded",
        "raise the disk quota of the worker's user (uid {uid}) on {mount}, or free space there",
    ),
    errno.EROFS: ("read-only file system", "remount {mount} read-write"),
    errno.EACCES: ("permission denied", "make {dir} writable by the worker's user (uid {uid}, gid {gid})"),
    errno.EPERM: (
        "operation not permitted",
        "make {dir} writable by the worker's user (uid {uid}, gid {gid})",
    ),
}
_S3_FIX = (
    "let the worker's S3 credentials (QKVAULT_S3_ACCESS_KEY_ID) read, write and delete objects under "
    "{resource} (s3:GetObject, s3:PutObject, s3:DeleteObject, s3:ListBucket)"
)


def not_writable(exc: BaseException, resource: str, operation: str) -> StoreNotWritable | None:
    """``exc`` as a :class:`~storage.errors.StoreNotWritable` when an operator can fix it: a full
    disk or quota (ENOSPC, EDQUOT), a read-only mount (EROFS), permissions (EACCES, EPERM; an S3
    access denial); None for any other error. ``resource``: the bundle's URL or path;
    ``operation``: what failed (e.g. ``write attention/c/0/0/0/0``)."""
    if isinstance(exc, StoreError) or not isinstance(exc, OSError):
        return None
    code = exc.errno
    if is_s3(resource):
        if not isinstance(exc, PermissionError):
            return None
        code = errno.EACCES
        reason, fix = "access denied", _S3_FIX.format(resource=resource)
        path, mount = resource, None
    elif code in _NOT_WRITABLE:
        path = os.fsdecode(exc.filename) if exc.filename else _strip_file_scheme(resource)
        mount = _mount_point(path)
        reason, template = _NOT_WRITABLE[code]
        fix = template.format(
            mount=mount,
            free=_free_space(mount),
            dir=os.path.dirname(path) or path,
            uid=os.geteuid(),
            gid=os.getegid(),
        )
    else:
        return None
    name = errno.errorcode.get(code, str(code))
    return StoreNotWritable(
        f"store not writable: {reason} ({name}) on {operation} in {resource}: {fix}",
        detail={
            "resource": resource,
            "path": path,
            "operation": operation,
            "errno": name,
            "reason": reason,
            "fix": fix,
            **({"mount": mount} if mount else {}),
        },
    )


@contextlib.contextmanager
def store_errors(resource: str, operation: str) -> Iterator[None]:
    """Raise the store errors an operator can fix as :class:`~storage.errors.StoreNotWritable`
    (:func:`not_writable`); any other error unchanged."""
    try:
        yield
    except OSError as exc:
        fixable = not_writable(exc, resource, operation)
        if fixable is None:
            raise
        raise fixable from exc


def _mount_point(path: str) -> str:
    """The mount point of the file system that holds ``path`` (or would, once it exists)."""
    current = Path(path).absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return str(current)


def _free_space(mount: str) -> str:
    try:
        usage = shutil.disk_usage(mount)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


async def retrying(what: str, op: Callable[[], Awaitable[T]], policy: StoreRetry) -> T:
    """Run ``op`` until it succeeds, a permanent error, or ``policy.deadline_s`` (StoreUnavailable)."""
    started = time.monotonic()
    delay, tries = policy.first_delay_s, 0
    while True:
        tries += 1
        try:
            return await op()
        except Exception as exc:
            spent = time.monotonic() - started
            if not is_transient(exc):
                raise
            if spent + delay > policy.deadline_s:
                raise StoreUnavailable(
                    f"object store: {what} failed {tries} times in {spent:.1f} s "
                    f"(retry budget {policy.deadline_s:g} s; QKVAULT_STORE_RETRY_S): "
                    f"{type(exc).__name__}: {exc}",
                    detail={"operation": what, "tries": tries, "seconds": round(spent, 1)},
                ) from exc
            log.warning(
                "object store: %s failed (%s: %s); retry %d in %.1f s",
                what,
                type(exc).__name__,
                exc,
                tries,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, policy.max_delay_s)


def zarr_store(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    read_only: bool = False,
    retry: StoreRetry | None = None,
) -> Any:
    """A zarr v3 store for a bundle URL: ``LocalStore`` for paths, ``FsspecStore`` (s3fs) for ``s3://``.

    ``retry``: the retry policy of ``s3://`` store operations (default :class:`StoreRetry`); local
    paths are never retried (a local disk error is not transient).
    """
    from zarr.storage import FsspecStore, LocalStore

    store: Any
    if is_s3(url):
        store = FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)
        retry = StoreRetry() if retry is None else retry
    else:
        path = Path(_strip_file_scheme(url)).expanduser()
        if not read_only:
            os.makedirs(path, exist_ok=True)
        return LocalStore(path, read_only=read_only)
    if retry.deadline_s > 0:
        from storage.stores.retry import RetryingStore

        store = RetryingStore(store, retry)
    return store
