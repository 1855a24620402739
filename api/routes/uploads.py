"""``/v1/uploads``: the source files of bulk jobs (docs/bulk-jobs.md).

- ``POST /v1/uploads``: the request body is the file (JSONL, Parquet or text; any content type),
  streamed into the object store piece by piece, never held whole in memory
  (:class:`storage.stores.uploads.UploadSink`); at most ``QKVAULT_MAX_UPLOAD_BYTES`` (413 past it,
  and what arrived is dropped), not bound by ``QKVAULT_MAX_REQUEST_BYTES``. 201 with ``Location``.
- ``POST /v1/uploads?presign=true`` (S3 stores): no body; 201 with a presigned ``PUT`` URL, to send
  the file straight to the object store.
- ``GET`` / ``DELETE /v1/uploads/{id}``: the caller's own uploads only. Uploads are kept per owner
  (:meth:`ObjectStore.upload_url`): another owner's id answers 404 like a missing one, for admin
  keys too, and a job reads only its owner's uploads.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import ObjectStoreDep, OwnerDep, RootPathDep, SettingsDep, get_principal
from api.problems import PROBLEM_JSON, ApiProblem, presign_lifetime
from api.schemas import ProblemDoc, UploadPublic
from api.settings import ApiSettings
from storage.inputs import utf8
from storage.stores.objectstore import ObjectStore
from storage.stores.uploads import (
    UPLOAD_ID_PATTERN,
    UploadRecord,
    UploadSink,
    UploadTooLarge,
    delete_upload,
    new_upload_id,
    presign_upload,
    read_upload,
)

PREFIX = "/v1/uploads"
router = APIRouter(prefix=PREFIX, tags=["uploads"], dependencies=[Depends(get_principal)])
PIECE_BYTES = 1 << 20  # handed to the store at a time
UPLOAD_NOT_FOUND = "upload-not-found"
PRESIGNED_UNAVAILABLE = "presigned-urls-unavailable"
LIMIT_SETTING = "QKVAULT_MAX_UPLOAD_BYTES"

UploadIdPath = Annotated[
    str, Path(min_length=1, max_length=64, pattern=UPLOAD_ID_PATTERN, description="upload id")
]


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ProblemDoc, "content": {PROBLEM_JSON: {}}} for s in sorted({401, 503, *statuses})}


def upload_public(record: UploadRecord, root_path: str = "", upload_url: str | None = None) -> UploadPublic:
    return UploadPublic(
        id=record.id,
        state="complete" if record.complete else "pending",
        nbytes=record.nbytes,
        sha256=record.sha256,
        filename=record.filename,
        created_at=record.created_at,
        links={"self": f"{root_path.rstrip('/')}{PREFIX}/{record.id}"},
        upload_url=upload_url,
        upload_method="PUT" if upload_url else None,
        expires_at=record.expires_at if upload_url else None,
    )


def _too_large(exc: UploadTooLarge | None, limit: int, declared: int | None = None) -> ApiProblem:
    size = f"upload of {declared} bytes" if declared is not None else "upload"
    msg = (
        exc.message
        if exc is not None
        else f"{size} exceeds this server's limit of {limit} bytes ({LIMIT_SETTING}); split the file, "
        "or ask the operator to raise the limit"
    )
    return ApiProblem(
        413,
        "upload-too-large",
        msg,
        title="Upload too large",
        extensions={"limit": limit, "setting": LIMIT_SETTING},
    )


async def _stream_into(sink: UploadSink, request: Request) -> UploadRecord:
    """Write the request body into ``sink`` in pieces of about ``PIECE_BYTES``; commit it."""
    pending = bytearray()
    try:
        async for piece in request.stream():
            pending += piece
            while len(pending) >= PIECE_BYTES:
                data = bytes(pending[:PIECE_BYTES])
                del pending[:PIECE_BYTES]
                await run_in_threadpool(sink.write, data)
        if pending:
            await run_in_threadpool(sink.write, bytes(pending))
        return await run_in_threadpool(sink.commit)
    except Exception:
        await run_in_threadpool(sink.abort)
        raise
    except BaseException:  # cancelled (the client went away): nothing may be awaited any more
        sink.abort()
        raise


@router.post(
    "",
    status_code=201,
    response_model=UploadPublic,
    summary="Upload a source file for bulk jobs (streamed), or get a presigned PUT URL (S3)",
    responses=_problems(409, 413, 422),
    openapi_extra={
        "requestBody": {
            "required": False,
            "description": "the file's bytes (JSONL, Parquet or plain text); none with presign=true",
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def create_upload(
    request: Request,
    response: Response,
    store: ObjectStoreDep,
    settings: SettingsDep,
    owner: OwnerDep,
    root_path: RootPathDep,
    filename: Annotated[
        str | None,
        Query(max_length=255, description="the file's name, kept for you to recognise it"),
        utf8("filename", nul=False),
    ] = None,
    presign: Annotated[
        bool, Query(description="S3 stores: answer a presigned PUT URL instead of reading a body")
    ] = False,
    expires_in: Annotated[
        int | None,
        Query(ge=1, description="presign=true: URL lifetime in seconds (default QKVAULT_PRESIGN_EXPIRES_S)"),
    ] = None,
) -> UploadPublic:
    """Store the request body as a new upload of the caller and answer its id, size and SHA-256:
    use the id as a job's ``source.upload``. The body is streamed into the object store (chunked
    transfer encoding or a ``Content-Length``); past ``QKVAULT_MAX_UPLOAD_BYTES`` the upload is
    dropped and the answer is 413 ``upload-too-large``.

    With ``presign=true`` (S3 stores only; 409 on a local store) no body is read: the answer holds
    ``upload_url``, a presigned URL to ``PUT`` the file to directly, without an API key, before
    ``expires_at``. Its state is ``pending`` until the file arrives (``GET /v1/uploads/{id}``)."""
    upload_id = new_upload_id()
    upload_url: str | None = None
    if presign:
        record, upload_url = await run_in_threadpool(
            _presign, store, settings, owner, upload_id, expires_in, filename
        )
    else:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
            raise _too_large(None, settings.max_upload_bytes, int(declared))
        sink = await run_in_threadpool(
            UploadSink, store, owner, upload_id, max_bytes=settings.max_upload_bytes, filename=filename
        )
        try:
            record = await _stream_into(sink, request)
        except UploadTooLarge as exc:
            raise _too_large(exc, settings.max_upload_bytes) from exc
    public = upload_public(record, root_path, upload_url)
    response.headers["Location"] = public.links["self"]
    return public


def _presign(
    store: ObjectStore,
    settings: ApiSettings,
    owner: str,
    upload_id: str,
    expires_in: int | None,
    filename: str | None,
) -> tuple[UploadRecord, str]:
    if store.is_local:
        raise ApiProblem(
            409,
            PRESIGNED_UNAVAILABLE,
            "this server keeps its store on a local disk, which has no presigned URLs; send the file "
            "as the body of POST /v1/uploads instead",
            title="Presigned URLs unavailable",
        )
    lifetime = presign_lifetime(expires_in, settings.presign_expires_s, settings.presign_max_expires_s)
    return presign_upload(
        store, owner, upload_id, lifetime, endpoint_url=settings.presign_endpoint_url, filename=filename
    )


def _not_found(upload_id: str) -> ApiProblem:
    return ApiProblem(
        404,
        UPLOAD_NOT_FOUND,
        f"upload {upload_id} not found (uploads are per owner: only the API keys of the owner who "
        "uploaded a file see it)",
        title="Upload not found",
    )


@router.get(
    "/{upload_id}", response_model=UploadPublic, summary="Get an upload", responses=_problems(404, 422)
)
def get_upload(
    upload_id: UploadIdPath, store: ObjectStoreDep, owner: OwnerDep, root_path: RootPathDep
) -> UploadPublic:
    """The caller's upload: its size and SHA-256, or ``pending`` for a presigned upload whose file has
    not arrived. Another owner's upload answers 404, like a missing one."""
    record = read_upload(store, owner, upload_id)
    if record is None:
        raise _not_found(upload_id)
    return upload_public(record, root_path)


@router.delete("/{upload_id}", status_code=204, summary="Delete an upload", responses=_problems(404, 422))
def delete_my_upload(upload_id: UploadIdPath, store: ObjectStoreDep, owner: OwnerDep) -> Response:
    """Remove the caller's upload from the store. A job still to read it fails, naming the upload."""
    if not delete_upload(store, owner, upload_id):
        raise _not_found(upload_id)
    return Response(status_code=204)
