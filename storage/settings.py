"""Settings shared by the API, the worker and the CLI (environment prefix ``QKVAULT_``).

Constructed once per process by the entry point and passed in; nothing reads the environment at
import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from storage.bundle.checksum import DEFAULT_CHECKSUM, ChecksumAlgorithm

DEFAULT_HOME = Path(".qkvault")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QKVAULT_", extra="ignore")

    # SQL index: sqlite:///path (WAL mode, busy timeout) or postgresql+psycopg://...
    database_url: str = f"sqlite:///{DEFAULT_HOME / 'index.db'}"
    # Object store root for bundles: file:///abs/path, a plain path, or s3://bucket/prefix
    store_url: str = str(DEFAULT_HOME / "store")
    s3_endpoint_url: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_region: str | None = None

    redis_url: str = "redis://127.0.0.1:6379/0"
    # Celery: soft < hard < visibility timeout (seconds)
    task_soft_time_limit_s: int = 6 * 3600
    task_hard_time_limit_s: int = 6 * 3600 + 300
    broker_visibility_timeout_s: int = 7 * 3600
    max_attempts: int = Field(3, ge=1, description="attempt cap kept in the database")
    queue_name: str = "qkvault-export"

    # worker
    model_cache_dir: Path = Path.home() / ".cache" / "qkvault" / "models"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    heartbeat_interval_s: float = Field(10.0, gt=0, description="lease renewal period of a running job")
    progress_interval_s: float = 0.5
    # chunk write pipeline (storage/bundle/pipeline.py; docs/benchmarks.md)
    write_threads: int = Field(0, ge=0, description="chunk encode/write threads (0: per core, at most 16)")
    record_interval_s: float = Field(
        0.5, ge=0, description="stored chunks are recorded in the index in batches at most this often"
    )
    chunk_checksum: ChecksumAlgorithm = Field(
        DEFAULT_CHECKSUM, description="checksum of every chunk record: crc32c (fast) or sha256"
    )
    # object store outages (docs/reliability.md): a store operation is retried with backoff for this
    # long, then the attempt gives the job back (queued again after retry_delay_s) while attempts last
    store_retry_s: float = Field(60.0, ge=0, description="retry budget of one object-store operation")
    retry_delay_s: float = Field(10.0, ge=0, description="delay before a job given back is run again")

    # reconciler (python -m worker.reconciler; docs/reliability.md)
    reconcile_interval_s: float = Field(30.0, gt=0, description="seconds between reconciler passes")
    lease_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a running job whose last heartbeat is older than this lost its worker; must "
        "exceed heartbeat_interval_s (allow several missed beats and the clock skew between hosts)",
    )
    requeue_after_s: float = Field(
        60.0,
        gt=0,
        description="a queued job untouched for this long whose message is not in the broker is "
        "re-enqueued (its message was lost)",
    )

    # api
    api_base_url: str = "http://127.0.0.1:8000"
    max_prompts: int = 64
    max_new_tokens: int = 4096

    @model_validator(mode="after")
    def _lease_outlives_heartbeat(self) -> Settings:
        if self.lease_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"lease_timeout_s ({self.lease_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s}): raise QKVAULT_LEASE_TIMEOUT_S (3x the interval or more)"
            )
        return self

    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs options for ``s3://`` store URLs (empty for local stores)."""
        opts: dict[str, object] = {}
        if self.s3_endpoint_url:
            opts["endpoint_url"] = self.s3_endpoint_url
        if self.s3_access_key_id:
            opts["key"] = self.s3_access_key_id
        if self.s3_secret_access_key:
            opts["secret"] = self.s3_secret_access_key.get_secret_value()
        if self.s3_region:
            opts["client_kwargs"] = {"region_name": self.s3_region}
        return opts
