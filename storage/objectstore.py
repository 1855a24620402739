"""Object stores that hold bundles: a local directory or S3 (through s3fs).

A bundle is addressed by URL: a local path (``/data/store/jobs/<id>.zarr``) or
``s3://bucket/prefix/jobs/<id>.zarr``. Clients are built lazily, so a Celery prefork child never
inherits an event loop or connection pool from its parent.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from storage.errors import StoreError

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
        with self.open_file(url, relpath) as fh:
            return fh.read()

    def iter_file(self, url: str, relpath: str, piece_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Read one file in pieces of ``piece_bytes`` (1 MiB default) without holding it whole."""
        with self.open_file(url, relpath) as fh:
            while piece := fh.read(piece_bytes):
                yield piece

    def exists(self, url: str, relpath: str = "zarr.json") -> bool:
        return bool(self.fs().exists(f"{self._path(url).rstrip('/')}/{relpath}"))

    def presigned_urls(self, url: str, relpaths: list[str], expires_s: int) -> list[str]:
        """Presigned HTTPS GET URLs (S3 SigV4, valid ``expires_s`` seconds) of files under ``url``:
        anyone holding one can read that object until it expires, without credentials. Signing is
        local (no request to S3). Local stores have no such URLs: StoreError."""
        if self.is_local:
            raise StoreError(f"{url} is on a local disk: presigned URLs exist only for s3:// stores")
        from fsspec.asyn import sync

        fs = self.fs()
        base = self._path(url).rstrip("/")

        async def sign_all() -> list[str]:
            import asyncio

            signed = await asyncio.gather(*(fs._url(f"{base}/{rel}", expires=expires_s) for rel in relpaths))
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


def zarr_store(url: str, *, storage_options: dict[str, Any] | None = None, read_only: bool = False) -> Any:
    """A zarr v3 store for a bundle URL: ``LocalStore`` for paths, ``FsspecStore`` (s3fs) for ``s3://``."""
    from zarr.storage import FsspecStore, LocalStore

    if is_s3(url):
        return FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)
    path = Path(_strip_file_scheme(url)).expanduser()
    if not read_only:
        os.makedirs(path, exist_ok=True)
    return LocalStore(path, read_only=read_only)
