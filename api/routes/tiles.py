"""``/v1/jobs/{id}/tiles``: multiscale tiles of one attention matrix (docs/viewer-api.md).

``GET .../tiles/{layer}/{head}/{seq}`` describes the pyramid of the model's ``layer`` and query
``head`` (real indices) for sequence ``seq``; ``GET .../{level}/{row}/{col}`` is one 256 × 256 tile,
rows queries and columns keys (real tokens only). Level 0 is read from the bundle; levels ≥ 1 are
pooled 2×2 (``max`` or ``mean``), built on the first request that needs them and cached in the
object store next to the bundle (:mod:`storage.bundle.tiles`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Response
from starlette.concurrency import run_in_threadpool

from api.bundle_views import PyramidsDep
from api.deps import JobDep, ObjectStoreDep, get_principal
from api.encode import NPY_MEDIA_TYPE, PNG_MEDIA_TYPE, colormap_rgba, npy_bytes, png_rgba
from api.problems import PROBLEM_JSON
from api.schemas import ProblemDoc
from api.viewer_schemas import TilePyramidPublic, pyramid_public

router = APIRouter(prefix="/v1/jobs", tags=["tiles"], dependencies=[Depends(get_principal)])

LayerPath = Annotated[int, Path(ge=0, description="the model's real layer index")]
HeadPath = Annotated[int, Path(ge=0, description="the model's real query-head index")]
SeqPath = Annotated[int, Path(ge=0, description="the sequence (job-wide for a bulk job)")]


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ProblemDoc, "content": {PROBLEM_JSON: {}}} for s in sorted({401, 503, *statuses})}


@router.get(
    "/{job_id}/tiles/{layer}/{head}/{seq}",
    response_model=TilePyramidPublic,
    summary="Describe the tile pyramid of one attention matrix",
    responses=_problems(404, 409, 422),
)
async def pyramid_info(
    job: JobDep, store: ObjectStoreDep, pyramids: PyramidsDep, layer: LayerPath, head: HeadPath, seq: SeqPath
) -> TilePyramidPublic:
    """Tokens per side, the size of every level (level 0 first; the last fits one tile), the pools,
    whether levels ≥ 1 are built yet, and the token strings of the axes."""

    def info() -> TilePyramidPublic:
        return pyramid_public(pyramids.get(job, store, layer, head, seq).info())

    return await run_in_threadpool(info)


@router.get(
    "/{job_id}/tiles/{layer}/{head}/{seq}/{level}/{row}/{col}",
    summary="One 256 × 256 tile",
    response_class=Response,
    responses={
        200: {
            "content": {NPY_MEDIA_TYPE: {}, PNG_MEDIA_TYPE: {}},
            "description": "`npy`: float32 [256, 256], NaN outside the matrix; `png`: RGBA, "
            "transparent outside",
        },
        **_problems(404, 409, 422),
    },
)
async def tile(
    job: JobDep,
    store: ObjectStoreDep,
    pyramids: PyramidsDep,
    layer: LayerPath,
    head: HeadPath,
    seq: SeqPath,
    level: Annotated[int, Path(ge=0, description="0: the data; L: 2^L × 2^L cells pooled")],
    row: Annotated[int, Path(ge=0, description="tile row (queries row·256 .. at this level)")],
    col: Annotated[int, Path(ge=0, description="tile column (keys col·256 .. at this level)")],
    pool: Annotated[
        Literal["max", "mean"], Query(description="how levels ≥ 1 pool (level 0 ignores it)")
    ] = "max",
    format: Annotated[Literal["npy", "png"], Query(description="`npy` (default) or `png`")] = "npy",
) -> Response:
    """Rows are queries and columns keys at ``level``; a level ≥ 1 tile is built with its pyramid on
    first request (seconds for long sequences), then read from the cache. ``png``: a viridis-like
    colormap over 0..1."""

    def render() -> Response:
        values = pyramids.get(job, store, layer, head, seq).tile(level, row, col, pool)
        if format == "png":
            return Response(png_rgba(colormap_rgba(values)), media_type=PNG_MEDIA_TYPE)
        return Response(npy_bytes(values), media_type=NPY_MEDIA_TYPE)

    return await run_in_threadpool(render)
