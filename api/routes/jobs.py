"""``/v1/jobs``: estimate, submit, list, inspect, cancel, list chunks, download the bundle.

Handlers are thin: validate (:mod:`api.admission`), call one index function, enqueue, return a
public schema. They are plain ``def``: FastAPI runs them in its thread pool (the index is sync).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import JSONResponse, StreamingResponse

from api.admission import Admission, admit, assess, require_estimate
from api.deps import CeleryDep, IndexDep, JobDep, ObjectStoreDep, OwnerDep, RootPathDep, SettingsDep
from api.problems import PROBLEM_JSON, ApiProblem
from api.schemas import (
    ChunkPublic,
    JobEstimate,
    JobList,
    JobPublic,
    ProblemDoc,
    chunk_public,
    estimate_public,
    job_public,
)
from api.settings import MAX_PAGE_SIZE
from storage.bundle.zipstream import iter_bundle_zip
from storage.errors import BundleNotReady
from storage.index import TERMINAL_STATES, JobState
from storage.jobspec import SMOLLM2_GGUF, JobSpec
from worker.app import enqueue_export, revoke_export

log = logging.getLogger("qkvault.api")

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ProblemDoc, "content": {PROBLEM_JSON: {}}} for s in statuses}


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
    responses=_problems(413, 422),
)
def estimate_job(
    spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)], settings: SettingsDep
) -> JobEstimate:
    """Per array: shape, chunks written, raw and expected stored bytes; totals, token counts and
    this server's limits (``within_limits``: whether a submission would pass). Nothing is stored.
    An upper bound on rows when sequences may stop at EOS. 422 for a spec the model cannot run, or
    when the model's config is not readable on this server (``estimate-unavailable``)."""
    return _estimate_public(spec, assess(spec, settings, enforce=False))


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    summary="Submit an export job",
    responses={
        200: {"model": JobEstimate, "description": "dry_run=true: the estimate; nothing stored"},
        **_problems(403, 413, 422),
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
    dry_run: Annotated[
        bool, Query(description="check and estimate only: 200 with the estimate, no job created")
    ] = False,
) -> JobPublic | JSONResponse:
    """Validate the spec against the model allowlist (403), server limits (422: prompts, tokens,
    expected stored size) and the model's shape, store the job (state ``queued``), then queue it
    for a worker. Answers 202 with ``Location`` of the job; with ``dry_run=true`` 200 with the
    estimate and nothing stored or queued."""
    admission = admit(spec, settings)
    if dry_run:
        return JSONResponse(_estimate_public(spec, admission).model_dump(mode="json"))
    job = index.create_job(
        spec=spec.model_dump(mode="json"),
        owner=owner,
        store_url_for=store.bundle_url,
        max_attempts=settings.max_attempts,
        label=spec.label,
    )
    try:  # after the commit: a worker must find the row
        enqueue_export(celery_app, job.id)
    except Exception as exc:  # broker down: the job stays queued; a reconciler re-enqueues it
        log.warning("job %s stored but not enqueued (broker unavailable: %s); it stays queued", job.id, exc)
    public = job_public(job, root_path)
    response.headers["Location"] = public.links.self_
    return public


@router.get("", response_model=JobList, summary="List my jobs, newest first", responses=_problems(400, 422))
def list_jobs(
    settings: SettingsDep,
    index: IndexDep,
    owner: OwnerDep,
    root_path: RootPathDep,
    limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE_SIZE, description="page size")] = None,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
) -> JobList:
    try:
        jobs, next_cursor = index.list_jobs(
            owner=owner, limit=limit or settings.default_page_size, cursor=cursor, state=state
        )
    except ValueError as exc:
        raise ApiProblem(
            400, "invalid-cursor", f"invalid cursor: {exc}; pass next_cursor from a previous page unchanged"
        ) from exc
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
    job: JobDep, index: IndexDep, celery_app: CeleryDep, owner: OwnerDep, root_path: RootPathDep
) -> JobPublic:
    """A queued job becomes ``cancelled`` at once; a running one becomes ``cancelling`` and stops at
    its next chunk boundary. A finished job answers 409."""
    updated = index.request_cancel(job.id, owner=owner)
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
        str | None, Query(max_length=255, description='only this array, e.g. "attention"')
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
    succeeded, or for a cancelled/failed job that left partial data (``X-Qkvault-Partial: true``)."""
    partial = job.state != JobState.SUCCEEDED
    if partial and not (job.state in TERMINAL_STATES and job.partial):
        if job.state in TERMINAL_STATES:
            raise BundleNotReady(f"no bundle: job {job.id} is {job.state} and left no partial data")
        raise BundleNotReady(
            f"bundle not ready: job is {job.state}; poll GET /v1/jobs/{job.id} until succeeded"
        )
    pieces = iter_bundle_zip(store, job.store_url, settings.bundle_piece_bytes)
    headers = {"Content-Disposition": f'attachment; filename="{job.id}.zarr.zip"'}
    if partial:
        headers["X-Qkvault-Partial"] = "true"
    return StreamingResponse(pieces, media_type="application/zip", headers=headers)
