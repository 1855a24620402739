"""``/v1/jobs/{id}/arrays``: a bundle's arrays, and slices of one read from the chunks they touch
(docs/viewer-api.md).

Selectors are query parameters named after the array's dimensions (``layer``, ``head``, ``query``,
``key``, ``position``, any other of its dimensions) plus ``seq``, the sequence: an integer picks one
index and drops the dimension, ``a:b`` is a half-open range (either side optional). Along
``layer``/``head``/``kv_head`` the numbers are the model's real indices. The slice is a ``.npy``
file by default, or JSON for small ones (``QKVAULT_JSON_SLICE_MAX_VALUES``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.bundle_views import open_view
from api.deps import JobDep, ObjectStoreDep, SettingsDep, get_principal
from api.encode import NPY_MEDIA_TYPE, json_values, npy_bytes
from api.problems import LIMIT_EXCEEDED, PROBLEM_JSON, ApiProblem
from api.schemas import ProblemDoc
from api.viewer_schemas import ArrayList, ArraySliceJson, array_public
from storage.bundle.selectors import Selector, parse_selector

router = APIRouter(prefix="/v1/jobs", tags=["arrays"], dependencies=[Depends(get_principal)])

# query parameters that are not dimension selectors
_NOT_SELECTORS = frozenset({"seq", "format"})
_SELECTOR_HELP = "one index (the dimension is dropped) or a half-open range a:b, either side optional"


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ProblemDoc, "content": {PROBLEM_JSON: {}}} for s in sorted({401, 503, *statuses})}


SeqQuery = Annotated[
    int | None,
    Query(ge=0, description="the sequence: job-wide index for a bulk job, else the `batch` index"),
]


@router.get(
    "/{job_id}/arrays",
    response_model=ArrayList,
    summary="List a bundle's arrays",
    responses=_problems(404, 409, 422),
)
def list_arrays(job: JobDep, store: ObjectStoreDep, seq: SeqQuery = None) -> ArrayList:
    """Every array of the job's bundle with its dims, shape, dtype and chunks; group arrays are
    named ``<group>/<name>`` (``summary/label``). A derived-attention bundle lists ``attention``
    with ``derived: true``. For a bulk job: the arrays of sequence ``seq``'s micro-batch (default 0)
    in their per-sequence form. With ``seq``, ``token_strings`` holds that sequence's tokens."""
    view = open_view(job, store)
    arrays = view.arrays(seq or 0)
    tokens = view.token_strings(view.locate(seq)) if seq is not None else None
    return ArrayList(
        job_id=job.id,
        format_version=view.format_version,
        bulk=view.bulk,
        sequences=view.sequences,
        arrays=[array_public(a) for a in arrays],
        token_strings=tokens,
    )


@router.get(
    "/{job_id}/arrays/{name:path}",
    summary="Read a slice of one array",
    response_model=None,
    responses={
        200: {
            "content": {
                NPY_MEDIA_TYPE: {},
                "application/json": {"schema": ArraySliceJson.model_json_schema()},
            },
            "description": "the slice: a .npy file (default) or JSON (`format=json`)",
        },
        **_problems(404, 409, 413, 422),
    },
)
async def read_slice(
    request: Request,
    job: JobDep,
    store: ObjectStoreDep,
    settings: SettingsDep,
    name: str,
    seq: SeqQuery = None,
    layer: Annotated[str | None, Query(description=f"real layer index: {_SELECTOR_HELP}")] = None,
    head: Annotated[str | None, Query(description=f"real head index: {_SELECTOR_HELP}")] = None,
    query: Annotated[str | None, Query(description=f"query rows: {_SELECTOR_HELP}")] = None,
    key: Annotated[str | None, Query(description=f"keys: {_SELECTOR_HELP}")] = None,
    position: Annotated[str | None, Query(description=f"token positions: {_SELECTOR_HELP}")] = None,
    format: Annotated[Literal["npy", "json"], Query(description="`npy` (default) or `json`")] = "npy",
) -> Response:
    """A slice of array ``name`` (``<group>/<name>`` inside a group), reading only the chunks it
    touches; derived attention is computed for just the slice. Any other dimension of the array
    is a query parameter too (``rank=0:5``, ``head_dim=0``). ``npy``: the values as stored
    (float16/float32). ``json``: ``{name, dims, shape, dtype, data}``, at most
    ``QKVAULT_JSON_SLICE_MAX_VALUES`` values (413 beyond)."""
    selectors: dict[str, Selector] = {
        dim: parse_selector(dim, text)
        for dim, text in request.query_params.items()
        if dim not in _NOT_SELECTORS
    }

    def read() -> Response:
        plan = open_view(job, store).plan(name, selectors, seq)
        if format == "json" and plan.values > settings.json_slice_max_values:
            raise ApiProblem(
                413,
                LIMIT_EXCEEDED,
                f"this slice of {name} has {plan.values:,} values {list(plan.shape)}; JSON slices hold at "
                f"most {settings.json_slice_max_values:,} (QKVAULT_JSON_SLICE_MAX_VALUES): ask for "
                "format=npy or a smaller slice",
                title="Slice too large",
                extensions={"limit": settings.json_slice_max_values, "values": plan.values},
            )
        if plan.nbytes > settings.slice_max_bytes:
            raise ApiProblem(
                413,
                LIMIT_EXCEEDED,
                f"this slice of {name} is {plan.nbytes:,} bytes {list(plan.shape)}; a slice reads at most "
                f"{settings.slice_max_bytes:,} (QKVAULT_SLICE_MAX_BYTES): ask for smaller ranges",
                title="Slice too large",
                extensions={"limit": settings.slice_max_bytes, "bytes": plan.nbytes},
            )
        data = plan.read()
        headers = {"X-Qkvault-Dims": ",".join(plan.dims)}
        if format == "json":
            body = ArraySliceJson(
                name=name,
                dims=list(plan.dims),
                shape=list(plan.shape),
                dtype=plan.dtype,
                data=json_values(data),
            )
            return Response(body.model_dump_json(), media_type="application/json", headers=headers)
        return Response(npy_bytes(data), media_type=NPY_MEDIA_TYPE, headers=headers)

    return await run_in_threadpool(read)
