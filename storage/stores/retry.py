"""A zarr store wrapper that retries transient failures (:class:`storage.stores.objectstore.StoreRetry`)."""

from __future__ import annotations

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from storage.stores.objectstore import StoreRetry, retrying


class RetryingStore(WrapperStore[Store]):
    """Retries ``set``/``get``/``exists``/``delete`` of the wrapped store with backoff, within
    ``policy.deadline_s`` per operation; then :class:`~storage.errors.StoreUnavailable`."""

    def __init__(self, store: Store, policy: StoreRetry) -> None:
        super().__init__(store)
        self.policy = policy

    def _with_store(self, store: Store) -> RetryingStore:
        return type(self)(store, self.policy)

    async def set(self, key: str, value: Buffer) -> None:
        await retrying(f"write {key}", lambda: self._store.set(key, value), self.policy)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await retrying(f"read {key}", lambda: self._store.get(key, prototype, byte_range), self.policy)

    async def exists(self, key: str) -> bool:
        return await retrying(f"stat {key}", lambda: self._store.exists(key), self.policy)

    async def delete(self, key: str) -> None:
        await retrying(f"delete {key}", lambda: self._store.delete(key), self.policy)
