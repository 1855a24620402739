"""The one place that decides how a bundle's objects reach its store (numpy + zarr only).

Every object a bundle writer stores goes through :meth:`ChunkStore.put`, whoever produced it: the
chunk pipeline's store threads (row blocks, bytes encoded by :class:`~storage.bundle.pipeline.
ChunkEncoder`) and zarr itself (array metadata, small arrays, groups), through the zarr view
:meth:`ChunkStore.zarr` returns. One attempt, first or resumed, local or S3:

1. **checksum** the stored bytes (the pipeline passes the digest it already computed);
2. **resume check** (a retried attempt, :class:`~storage.bundle.resume.ResumeSet`): a chunk an
   earlier attempt recorded is not written again when the new bytes and the stored object both
   have the recorded checksum (``skipped``); it is written when the object is missing or torn
   (``rewritten``) or when the new bytes differ (``changed``);
3. **store**: a local bundle's files are written from the calling thread (a temporary file renamed
   into place: readers never see a partial chunk); an ``s3://`` bundle goes through zarr's
   ``FsspecStore`` under the retry policy :class:`~storage.stores.objectstore.StoreRetry` (transient
   errors retried with backoff, then :class:`~storage.errors.StoreUnavailable`);
4. **record**: each stored (or verified) chunk becomes a :class:`~storage.bundle.records.
   ChunkRecord` handed to ``on_stored``, from the storing thread, once the store confirmed it.
   Metadata documents are stored but not recorded.

A store that refuses a write, a read or a delete for a reason an operator can fix (disk full or
over quota, read-only, permission denied) raises :class:`~storage.errors.StoreNotWritable` naming
the bundle, the errno and the fix (:func:`storage.stores.objectstore.not_writable`, one
classification for every object and for the bundle directory itself).

Deleting follows the same resume rule: while resuming, array creation (zarr's ``overwrite=True``
deletes an array's keys) keeps recorded chunks and deletes only the other keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.common import ZARR_JSON
from zarr.core.sync import sync
from zarr.storage import LocalStore, WrapperStore

from storage.bundle.checksum import DEFAULT_CHECKSUM, ChecksumAlgorithm, checksum, matches
from storage.bundle.records import ChunkRecord, parse_chunk_key
from storage.bundle.resume import ResumeSet
from storage.stores.objectstore import StoreRetry, not_writable, store_errors, zarr_store

__all__ = ["ChunkStore"]


_PARTIAL = ".partial"  # a local write's temporary file: ".<name>.<hex>.partial", then renamed


class LocalFiles:
    """A local bundle directory, written and read from the calling thread (no event loop: the
    pipeline's store threads write in parallel). A write is a handful of system calls on string
    paths: the store threads write thousands of chunks a second beside the forward pass, and every
    microsecond of Python they spend holding the GIL is one the forward pass may wait."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_path = str(root)
        self._made: set[str] = set()
        # a temporary file's name: this store's random token and a count (unique across processes
        # writing one directory, e.g. a job's layer shards; no random read per write)
        self._token = uuid.uuid4().hex[:12]
        self._count = itertools.count()
        # empty when this store began: a killed process left nothing here (a micro-batch group's
        # writer, a job's first attempt), so :meth:`remove_leftovers` has nothing to look for
        self.began_empty = _empty(root)

    def write(self, key: str, data: bytes) -> None:
        path = os.path.join(self.root_path, key)
        parent, name = os.path.split(path)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        tmp = os.path.join(parent, f".{name}.{self._token}{next(self._count):x}{_PARTIAL}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                fd = os.open(tmp, flags, 0o666)
            except FileNotFoundError:  # its directory was removed since (an array created anew)
                os.makedirs(parent, exist_ok=True)
                fd = os.open(tmp, flags, 0o666)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def remove_leftovers(self) -> list[str]:
        """Delete the temporary files of writes a killed process never renamed; their keys. None
        when the directory began empty: this process's own writes leave none (a failed write
        removes its temporary file), and the writers of other processes into it (a job's layer
        shards) are finished by a store made after them."""
        if self.began_empty:
            return []
        removed = []
        for path in self.root.rglob(f".*{_PARTIAL}"):
            path.unlink(missing_ok=True)
            removed.append(path.relative_to(self.root).as_posix())
        return sorted(removed)


def _write_all(fd: int, data: bytes) -> None:
    """Every byte of ``data`` to ``fd`` (a write may take fewer bytes than it was given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _empty(directory: Path) -> bool:
    """Whether ``directory`` is missing or holds nothing."""
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is None
    except FileNotFoundError:
        return True


class _ZarrObjects:
    """Any other store (S3): zarr's store, driven on zarr's event loop from the calling thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._prototype = default_buffer_prototype()

    def write(self, key: str, data: bytes) -> None:
        sync(self.store.set(key, self._prototype.buffer.from_bytes(data)))

    def read(self, key: str) -> bytes | None:
        found = sync(self.store.get(key, prototype=self._prototype))
        return None if found is None else found.to_bytes()


class ChunkStore:
    """Stores a bundle's objects: checksum → resume check → store → record (module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        retry: StoreRetry | None = None,
        resume: ResumeSet | None = None,
        checksum_algorithm: ChecksumAlgorithm = DEFAULT_CHECKSUM,
        on_stored: Callable[[ChunkRecord], None] | None = None,
        key_prefix: str = "",
    ) -> None:
        """``retry``: the retry policy of ``s3://`` stores (local disks are not retried: their
        errors are not transient); ``resume``: chunks recorded by an earlier attempt;
        ``on_stored(record)``: called from the storing thread for every stored chunk;
        ``key_prefix``: where ``url`` lies inside the job's bundle (a bulk job's micro-batch group,
        ``"batches/000012/"``): records and the resume check use keys relative to the bundle."""
        self.url = url
        self.key_prefix = key_prefix
        self.resume = resume
        self.algorithm: ChecksumAlgorithm = checksum_algorithm
        self._on_stored = on_stored
        with store_errors(url, "create the bundle directory"):
            self._base: Store = zarr_store(url, storage_options=storage_options, retry=retry)
        self._objects: LocalFiles | _ZarrObjects
        if isinstance(self._base, LocalStore):
            self._objects = LocalFiles(Path(self._base.root))
        else:
            self._objects = _ZarrObjects(self._base)
        # every metadata document stored through this object, by key, while it knows them all (a
        # local directory that began empty): :meth:`documents`
        self._documents: dict[str, bytes] | None = None
        if isinstance(self._objects, LocalFiles) and self._objects.began_empty:
            self._documents = {}
        self._documents_lock = threading.Lock()

    @property
    def is_local(self) -> bool:
        return isinstance(self._objects, LocalFiles)

    def remove_leftovers(self) -> list[str]:
        """Delete what writes into this store that never finished left behind: a local bundle's
        temporary files of a process killed mid-write (an S3 object is whole or absent, so none
        there). Only for a writer that knows no write into its directory is under way (the last
        write of a bundle or of a micro-batch group); returns the keys removed."""
        if not isinstance(self._objects, LocalFiles):
            return []
        with store_errors(self.url, "remove the temporary files of unfinished writes"):
            return self._objects.remove_leftovers()

    def read(self, key: str) -> bytes | None:
        """One object's bytes, None when it does not exist (a local file read from the calling
        thread; S3 through zarr's store)."""
        with store_errors(self.url, f"read {key}"):
            return self._objects.read(key)

    def put(self, key: str, data: bytes, digest: str | None = None) -> None:
        """Store one object (thread-safe). ``digest``: ``checksum(data, self.algorithm)`` when the
        caller computed it already. Raises :class:`~storage.errors.StoreNotWritable` when the
        store refuses it for a reason an operator can fix."""
        parsed = parse_chunk_key(key)
        with store_errors(self.url, f"write {key}"):
            if parsed is None:  # a metadata document: always written, never recorded
                self._objects.write(key, data)
                self._document_written(key, data)
                return
            digest = digest or checksum(data, self.algorithm)
            if self._should_write(key, data, digest):
                self._objects.write(key, data)
        self._record(key, parsed, len(data), digest)

    def _record(self, key: str, parsed: tuple[str, tuple[int, ...]], nbytes: int, digest: str) -> None:
        """Step 4: chunk ``key`` (``parsed``: its array and coordinates) to ``on_stored``."""
        if self._on_stored is not None:
            array = self.key_prefix + parsed[0]
            self._on_stored(ChunkRecord(array, parsed[1], self.key_prefix + key, nbytes, digest))

    # -- chunks encoded and written by other processes (storage/bundle/pipeline.py ChunkSink) ----
    def local_root(self) -> str | None:
        """The local bundle directory another process writes this store's files into (None: not a
        local bundle; the bytes come back to be stored here)."""
        return self._objects.root_path if isinstance(self._objects, LocalFiles) else None

    def stored_elsewhere(self, key: str, nbytes: int, digest: str) -> None:
        """Record chunk ``key``, written whole (``nbytes``, ``digest``) into :meth:`local_root` by
        another process: step 4 of :meth:`put` (steps 1-3 happened there; never for a chunk
        :meth:`keeps`, whose resume check is here)."""
        parsed = parse_chunk_key(key)
        if parsed is None:
            raise ValueError(f"{key} is not a chunk key")
        self._record(key, parsed, nbytes, digest)

    def write_error(self, key: str, error: BaseException) -> BaseException:
        """``error`` of another process's write of ``key`` as :meth:`put` would raise it (an error
        an operator can fix: :class:`~storage.errors.StoreNotWritable`)."""
        fixable = not_writable(error, self.url, f"write {key}")
        if fixable is None:
            return error
        fixable.__cause__ = error  # as store_errors raises it
        return fixable

    def _document_written(self, key: str, data: bytes | None) -> None:
        if self._documents is None or not key.endswith(ZARR_JSON):
            return
        with self._documents_lock:
            if data is None:
                self._documents.pop(key, None)
            else:
                self._documents[key] = data

    def documents(self) -> dict[str, bytes] | None:
        """Every node's ``zarr.json`` in this store, by key, as stored through this object — None
        unless it stored them all (a local directory that was empty when it began; not S3, whose
        earlier objects would take a listing to rule out)."""
        if self._documents is None:
            return None
        with self._documents_lock:
            return dict(self._documents)

    def _should_write(self, key: str, data: bytes, digest: str) -> bool:
        """The resume check (module docstring, step 2). A record names its algorithm: an earlier
        attempt may have used another one."""
        recorded = None if self.resume is None else self.resume.checksums.get(self.key_prefix + key)
        if recorded is None:
            return True
        assert self.resume is not None
        if digest != recorded and not matches(data, recorded):
            self.resume.count("changed")
            return True
        stored = self._objects.read(key)
        if stored is None or len(stored) != len(data) or not matches(stored, recorded):
            self.resume.count("rewritten")
            return True
        self.resume.count("skipped", len(stored))
        return False

    def keeps(self, key: str) -> bool:
        """Whether deleting ``key`` is refused: a chunk recorded by an earlier attempt."""
        return self.resume is not None and self.key_prefix + key in self.resume

    async def delete(self, store: Store, key: str) -> None:
        """Delete ``key`` from ``store`` (zarr's view of this one) unless :meth:`keeps` refuses."""
        if not self.keeps(key):
            with store_errors(self.url, f"delete {key}"):
                await store.delete(key)
            self._document_written(key, None)

    def zarr(self) -> Store:
        """A zarr store whose writes and deletes go through this object (reads pass through)."""
        return _ZarrView(self._base, self)


class _ZarrView(WrapperStore[Store]):
    """zarr's view of a :class:`ChunkStore`: ``set`` is :meth:`ChunkStore.put` (run off zarr's
    event loop, so a local write or a retried S3 write never blocks it), deletes skip the keys
    :meth:`ChunkStore.keeps`."""

    def __init__(self, store: Store, chunks: ChunkStore) -> None:
        super().__init__(store)
        self._chunks = chunks

    def _with_store(self, store: Store) -> _ZarrView:
        return type(self)(store, self._chunks)

    async def set(self, key: str, value: Buffer) -> None:
        await asyncio.to_thread(self._chunks.put, key, value.to_bytes())

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not await self._store.exists(key):
            await self.set(key, value)

    async def delete(self, key: str) -> None:
        await self._chunks.delete(self._store, key)

    async def delete_dir(self, prefix: str) -> None:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        for key in await _collect(self._store.list_prefix(prefix)):
            await self._chunks.delete(self._store, key)


async def _collect(keys: AsyncIterator[str]) -> Iterable[str]:
    return [key async for key in keys]
