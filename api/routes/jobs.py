"""``/v1/jobs``: estimate, submit, list, inspect, cancel, list chunks, download the bundle.

Handlers are thin: validate (:mod:`api.admission`), call one index function, enqueue, return a
public schema. They are plain ``def``: FastAPI runs them in its thread pool (the index is sync).
Every route needs an API key (router dependency :func:`api.deps.get_principal`, checked before
anything else); a job of another owner answers exactly like a missing one (404).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from api.admission import Admission, admit, assess, require_estimate
from api.deps import (
    CeleryDep,
    IndexDep,
    JobDep,
    ObjectStoreDep,
    OwnerDep,
    OwnerScopeDep,
    RootPathDep,
    SettingsDep,
    get_principal,
)
from api.problems import PROBLEM_JSON, ApiProblem, presign_lifetime
from api.schemas import (
    BundleUrls,
    ChunkPublic,
    JobEstimate,
    JobList,
    JobPublic,
    PresignedObject,
    ProblemDoc,
    chunk_public,
    estimate_public,
    job_public,
)
from api.settings import MAX_PAGE_SIZE
from storage.bundle.zipstream import open_bundle_zip
from storage.errors import BundleNotReady
from storage.index import TERMINAL_STATES, JobRecord, JobState
from storage.index.submit import submit_job as submit_to_index
from storage.inputs import utf8
from storage.jobs.spec import JobSpec
from storage.models.routing import job_queue
from storage.models.spec import SMOLLM2_GGUF
from worker.app import enqueue_export, revoke_export

log = logging.getLogger("qkvault.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(get_principal)])
PRESIGNED_UNAVAILABLE = "presigned-urls-unavailable"
IDEMPOTENT_REPLAYED = "Idempotent-Replayed"


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    # every route here may answer 401 (missing, unknown or revoked API key) and 503 (the index
    # database unavailable past QKVAULT_DB_RETRY_S: `index-unavailable`, with Retry-After)
    return {s: {"model": ProblemDoc, "content": {PROBLEM_JSON: {}}} for s in sorted({401, 503, *statuses})}


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="any unique string (e.g. a UUID) of visible ASCII: a retry with the same key and "
        "the same spec returns the job created first (200) instead of creating another; the same key "
        "with a different spec is refused (422). Scoped to the key's owner; kept as long as the job.",
    ),
]


SPEC_EXAMPLES: dict[str, dict[str, Any]] = {
    "minimal": {
        "summary": "Attention of one prompt (prefill only)",
        "value": {"model": {"id": SMOLLM2_GGUF}, "prompts": ["The capital of France is"]},
    },
    "generate": {
        "summary": "Two prompts, 8 generated tokens, attention + Q/K/V of three layers",
        "value": {
            "model": {"id": SMOLLM2_GGUF},
            "prompts": ["The capital of France is", "def fibonacci(n):"],
            "generation": {"max_new_tokens": 8},
            "capture": {"attention": True, "qkv": True, "layers": [0, 15, 29]},
            "storage": {"attention_dtype": "float16"},
            "label": "smollm2 demo",
        },
    },
}


def _estimate_public(spec: JobSpec, admission: Admission) -> JobEstimate:
    return estimate_public(
        require_estimate(spec, admission),
        spec.model.id,
        [limit.public() for limit in admission.limits],
        admission.model_allowed,
    )


@router.post(
    "/estimate",
    response_model=JobEstimate,
    summary="Estimate a job's size without running it",
    responses=_problems(413, 422, 503),
)
def estimate_job(
    spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    settings: SettingsDep,
    store: ObjectStoreDep,
    owner: OwnerDep,
) -> JobEstimate:
    """Per array: shape, chunks written, raw and expected stored bytes; totals, token counts and
    this server's limits (``within_limits``: whether a submission would pass). Nothing is stored.
    An upper bound on rows when sequences may stop at EOS. 422 for a spec the model cannot run, or
    when the model's config is not readable on this server (``estimate-unavailable``) or a hub
    model is missing from the workers' cache (``model-not-cached``, with ``QKVAULT_HUB_CACHE_DIR``).
    503 ``server-misconfigured`` when this server lacks a package it needs (e.g. ``tokenizers``)."""
    return _estimate_public(spec, assess(spec, settings, enforce=False, store=store, owner=owner))


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Submit an export job",
    responses={
        200: {
            "model": JobPublic | JobEstimate,
            "description": "a retry with the same Idempotency-Key and spec: the job created first "
            "(`Idempotent-Replayed: true`, `Location`); or, with dry_run=true, the estimate (nothing stored)",
        },
        **_problems(403, 413, 422, 429, 503),
    },
)
def submit_job(
    spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    response: Response,
    settings: SettingsDep,
    index: IndexDep,
    store: ObjectStoreDep,
    celery_app: CeleryDep,
    owner: OwnerDep,
    root_path: RootPathDep,
    idempotency_key: IdempotencyKeyHeader = None,
    dry_run: Annotated[
        bool, Query(description="check and estimate only: 200 with the estimate, no job created")
    ] = False,
) -> JobPublic | JSONResponse:
    """Validate the spec against the model allowlist (403), server limits (422: prompts, tokens,
    expected stored size) and the model's shape, check the owner's jobs in flight (429 at
    ``QKVAULT_MAX_JOBS_IN_FLIGHT``), store the job (state ``queued``), then queue it for a worker.
    Answers 202 with ``Location`` of the job; with ``dry_run=true`` 200 with the estimate and
    nothing stored or queued (the Idempotency-Key is ignored then).

    With ``Idempotency-Key``: a retry carrying the same key and the same spec (compared after
    validation, so key order and defaults do not matter) answers **200** with the job created first,
    its ``Location`` and ``Idempotent-Replayed: true``; nothing new is stored or queued. The same
    key with a different spec answers 422 ``idempotency-key-reused``."""
    admission = admit(spec, settings, store=store, owner=owner)
    if dry_run:
        return JSONResponse(_estimate_public(spec, admission).model_dump(mode="json"))
    submitted = submit_to_index(
        index,
        spec=spec.model_dump(mode="json"),
        owner=owner,
        store_url_for=store.bundle_url,
        max_attempts=settings.max_attempts,
        label=spec.label,
        idempotency_key=idempotency_key,
        max_in_flight=settings.max_jobs_in_flight,
        tokens_total=admission.bulk_tokens,
    )
    job = submitted.job
    if submitted.created:
        try:  # after the commit: a worker must find the row
            enqueue_export(celery_app, job.id, queue=job_queue(settings.queue_name, spec.model))
        except Exception as exc:  # broker down: the job stays queued; a reconciler re-enqueues it
            log.warning("job %s stored but not enqueued (broker unavailable: %s); stays queued", job.id, exc)
    else:
        response.status_code = 200
        response.headers[IDEMPOTENT_REPLAYED] = "true"
    public = job_public(job, root_path)
    response.headers["Location"] = public.links["self"]
    return public


@router.get(
    "",
    response_model=JobList,
    summary="List my jobs (an admin key: everyone's), newest first",
    responses=_problems(400, 422),
)
def list_jobs(
    settings: SettingsDep,
    index: IndexDep,
    scope: OwnerScopeDep,
    root_path: RootPathDep,
    limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE, description="page size")] = None,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
) -> JobList:
    try:
        jobs, next_cursor = index.list_jobs(
            owner=scope, limit=limit or settings.default_page_size, cursor=cursor, state=state
        )
    except ValueError as exc:
        raise ApiProblem(400, "invalid-cursor", str(exc)) from exc  # names the cursor and the fix
    return JobList(items=[job_public(j, root_path) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, summary="Get a job", responses=_problems(404))
def get_job(job: JobDep, root_path: RootPathDep) -> JobPublic:
    return job_public(job, root_path)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    summary="Cancel a job",
    responses=_problems(404, 409),
)
def cancel_job(
    job: JobDep, index: IndexDep, celery_app: CeleryDep, scope: OwnerScopeDep, root_path: RootPathDep
) -> JobPublic:
    """A queued job becomes ``cancelled`` at once; a running one becomes ``cancelling`` and stops at
    its next chunk boundary. A finished job answers 409."""
    updated = index.request_cancel(job.id, owner=scope)
    if job.state == JobState.QUEUED and updated.state == JobState.CANCELLED:
        try:  # best effort: a worker that still receives it sees the cancelled row and skips it
            revoke_export(celery_app, job.id)
        except Exception as exc:
            log.warning("job %s cancelled but not revoked in the broker: %s", job.id, exc)
    return job_public(updated, root_path)


@router.get(
    "/{job_id}/chunks",
    response_model=list[ChunkPublic],
    summary="Chunks written so far (from the index)",
    responses=_problems(404),
)
def list_chunks(
    job: JobDep,
    index: IndexDep,
    array: Annotated[
        str | None,
        Query(max_length=255, description='only this array, e.g. "attention"'),
        utf8("array", nul=False),
    ] = None,
) -> list[ChunkPublic]:
    return [chunk_public(c) for c in index.list_chunks(job.id, array=array)]


@router.get(
    "/{job_id}/bundle",
    response_class=StreamingResponse,
    summary="Download the bundle as a zip",
    responses={
        200: {"content": {"application/zip": {}}, "description": "ZIP_STORED zip with zarr.json at its root"},
        **_problems(404, 409),
    },
)
def download_bundle(job: JobDep, store: ObjectStoreDep, settings: SettingsDep) -> StreamingResponse:
    """Stream the Zarr v3 store as a zip; open it with
    ``xr.open_zarr(zarr.storage.ZipStore(path, mode="r"), zarr_format=3)``. Available once the job
    succeeded, or for a cancelled/failed job that left partial data (``X-Qkvault-Partial: true``).
    ``Content-Length`` is exact (computed from the store's listing before streaming), so a client
    can show a percentage and tell a truncated download from a complete one."""
    partial = _require_bundle(job)
    bundle = open_bundle_zip(store, job.store_url, settings.bundle_piece_bytes)
    headers = {
        "Content-Disposition": f'attachment; filename="{job.id}.zarr.zip"',
        "Content-Length": str(bundle.size),
    }
    if partial:
        headers["X-Qkvault-Partial"] = "true"
    return StreamingResponse(bundle.pieces, media_type="application/zip", headers=headers)


def _require_bundle(job: JobRecord) -> bool:
    """Whether the bundle is partial; BundleNotReady (409) when there is none to download."""
    partial = job.state != JobState.SUCCEEDED
    if partial and not (job.state in TERMINAL_STATES and job.partial):
        if job.state in TERMINAL_STATES:
            raise BundleNotReady(f"no bundle: job {job.id} is {job.state} and left no partial data")
        raise BundleNotReady(
            f"bundle not ready: job is {job.state}; poll GET /v1/jobs/{job.id} until succeeded"
        )
    return partial


@router.get(
    "/{job_id}/bundle/urls",
    response_model=BundleUrls,
    summary="Presigned URLs of the bundle's objects (S3 stores)",
    responses=_problems(404, 409, 422),
)
def bundle_urls(
    job: JobDep,
    store: ObjectStoreDep,
    settings: SettingsDep,
    expires_in: Annotated[
        int | None,
        Query(
            ge=1,
            description="URL lifetime in seconds (default QKVAULT_PRESIGN_EXPIRES_S, at most "
            "QKVAULT_PRESIGN_MAX_EXPIRES_S)",
        ),
    ] = None,
    prefix: Annotated[
        str | None, Query(max_length=255, description='only keys starting with this, e.g. "attention/"')
    ] = None,
) -> BundleUrls:
    """For a bundle on S3: one presigned GET URL per object of the Zarr store (``zarr.json``
    files and chunks), valid ``expires_in`` seconds, fetchable by any HTTP client without an API
    key or S3 credentials. Save each object as ``<id>.zarr/<key>`` and open the directory with
    xarray (``Client.download(..., presigned=True)`` does exactly that). Bundles on a local disk
    are served only through ``GET /v1/jobs/{id}/bundle``: 409 ``presigned-urls-unavailable``."""
    partial = _require_bundle(job)
    if store.is_local:
        raise ApiProblem(
            409,
            PRESIGNED_UNAVAILABLE,
            "this server keeps bundles on a local disk, which has no presigned URLs; download the "
            f"zip through the API: GET /v1/jobs/{job.id}/bundle",
            title="Presigned URLs unavailable",
        )
    lifetime = presign_lifetime(expires_in, settings.presign_expires_s, settings.presign_max_expires_s)
    files = [(key, size) for key, size in store.list_files(job.store_url) if key.startswith(prefix or "")]
    signed_at = datetime.now(UTC)
    urls = store.presigned_urls(
        job.store_url, [key for key, _ in files], lifetime, endpoint_url=settings.presign_endpoint_url
    )
    return BundleUrls(
        job_id=job.id,
        partial=partial,
        expires_in=lifetime,
        expires_at=signed_at + timedelta(seconds=lifetime),
        total_bytes=sum(size for _, size in files),
        objects=[
            PresignedObject(key=key, nbytes=size, url=url)
            for (key, size), url in zip(files, urls, strict=True)
        ],
    )
