"""Settings of the worker deployable: ``python -m worker`` and ``python -m worker.reconciler``.

The shared :class:`storage.settings.ServiceSettings` (index, store, broker, model cache) plus the
worker's own knobs, from ``QKVAULT_*``. Constructed once by each entry point and passed in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from storage.bundle.checksum import DEFAULT_CHECKSUM, ChecksumAlgorithm
from storage.bundle.records import ChunkRecord
from storage.bundle.resume import ResumeSet
from storage.settings import ServiceSettings, list_setting
from storage.stores.objectstore import StoreRetry

PlacementPackage = Literal["accelerate", "bitsandbytes"]


class WorkerSettings(ServiceSettings):
    """Worker settings; every field has a default and may come from ``QKVAULT_<NAME>``."""

    if TYPE_CHECKING:  # every field is optional (env or default); mypy cannot see Field(<positional default>)

        def __init__(self, **values: Any) -> None: ...

    deployable: ClassVar[str | None] = "worker"

    device: str = Field(default="auto", description="`auto` (CUDA if present), `cpu`, `cuda` or `cuda:N`")
    heartbeat_interval_s: float = Field(
        default=10.0, gt=0, description="lease renewal period of a running job"
    )
    progress_interval_s: float = Field(
        default=0.5,
        ge=0,
        description="how often a running job writes its progress and reads its cancel request",
    )
    # chunk write pipeline (storage/bundle/pipeline.py; docs/benchmarks.md)
    write_threads: int = Field(
        default=0,
        ge=0,
        description="chunk encoder/writer threads (0: one a core, at most 16; docs/benchmarks.md)",
    )
    write_processes: bool = Field(
        default=True,
        description="on CUDA, encode, checksum and write the chunks copied from the GPU in as many processes "
        "as encoder threads (storage/bundle/encodeprocs.py): the encoders then do not slow the forward "
        "pass by taking its GIL (docs/benchmarks.md); off: in the encoder threads",
    )
    record_interval_s: float = Field(
        default=0.5, ge=0, description="stored chunks are recorded in the index in batches at most this often"
    )
    chunk_checksum: ChecksumAlgorithm = Field(
        default=DEFAULT_CHECKSUM,
        description="checksum of every chunk record: `crc32c` (CRC-32C, hardware-accelerated, ~6 GB/s a "
        "core) or `sha256` (0.4-1.3 GB/s a core: a third of the writer's CPU time). A record names its "
        "algorithm; resumes verify either",
    )
    # object store outages (docs/reliability.md): a store operation is retried with backoff for this
    # long, then the attempt gives the job back (queued again after retry_delay_s) while attempts last
    store_retry_s: float = Field(
        default=60.0, ge=0, description="retry budget of one object-store operation (docs/reliability.md)"
    )
    retry_delay_s: float = Field(
        default=10.0,
        ge=0,
        description="delay before a job given back (store outage, store disk full or not writable) is "
        "run again",
    )
    shard_micro_batches: int = Field(
        default=0,
        ge=0,
        description="scale-out: a bulk job planned into more micro-batches than this is split into shards "
        "of this many micro-batches, run by every worker that listens (docs/operations.md 'Scale-out'); "
        "0: never (each job on one worker)",
    )
    shard_layers: int = Field(
        default=0,
        ge=0,
        description="scale-out: a one-batch job (prompts) exporting more layers than this, with no "
        "generated tokens, is split into shards of this many exported layers, run by every worker that "
        "listens (docs/operations.md 'Scale-out'); 0: never",
    )

    placement_packages: Annotated[list[PlacementPackage], NoDecode] | None = Field(
        default=None,
        description="the optional packages this worker offers to jobs with placement options "
        "(comma-separated: `accelerate`, `bitsandbytes`; `none`: none, so it takes jobs without "
        "placement options only). Unset: every one that imports. Decides the queues the worker "
        "consumes and what it reports (docs/operations.md 'Model placement')",
    )

    # reconciler (python -m worker.reconciler; docs/reliability.md)
    reconcile_interval_s: float = Field(default=30.0, gt=0, description="reconciler: seconds between passes")
    lease_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="reconciler (and a worker claiming a job): a running job whose last heartbeat is older "
        "than this lost its worker; must exceed `QKVAULT_HEARTBEAT_INTERVAL_S` (allow several missed "
        "beats and "
        "the clock skew between hosts)",
    )
    requeue_after_s: float = Field(
        default=60.0,
        gt=0,
        description="reconciler: a queued job untouched for this long whose message is not in the broker "
        "is re-enqueued (its message was lost)",
    )

    test_model_cache: Path | None = Field(
        default=None,
        description="source checkouts only: the dequantised-GGUF cache that the test suite, the workers "
        "it starts and `bench` share (unset: `<checkout>/.qkvault/test-models`)",
    )

    def writer_options(
        self,
        *,
        storage_options: dict[str, Any],
        on_chunk: Callable[[ChunkRecord], None],
        resume: ResumeSet | None,
    ) -> dict[str, Any]:
        """A job's :class:`~storage.bundle.writer.BundleWriter` keyword arguments: these settings',
        with the store's options, where chunk records go and what an earlier attempt recorded."""
        return {
            "storage_options": storage_options,
            "on_chunk": on_chunk,
            "resume": resume,
            "retry": StoreRetry(deadline_s=self.store_retry_s),
            "write_threads": self.write_threads or None,
            "write_processes": self.write_processes,
            "checksum_algorithm": self.chunk_checksum,
        }

    @field_validator("placement_packages", mode="before")
    @classmethod
    def _package_list(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "none":
            return []
        return list_setting(value)

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> WorkerSettings:
        if self.lease_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"lease_timeout_s ({self.lease_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}): raise {self.env_var('lease_timeout_s')} "
                "(3x the interval or more)"
            )
        return self
