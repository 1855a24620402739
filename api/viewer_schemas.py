"""Response schemas of the slice and tile routes (``api/routes/arrays.py``, ``api/routes/tiles.py``;
docs/viewer-api.md)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from storage.bundle.slices import ArrayInfo
from storage.bundle.tiles import PyramidInfo


class ArrayPublic(BaseModel):
    name: str = Field(
        description="`<group>/<array>` inside a group, else the array's name", examples=["attention"]
    )
    group: str = Field(description='"" for root arrays, e.g. "summary" for the summary group', examples=[""])
    dims: list[str] = Field(examples=[["layer", "batch", "head", "query", "key"]])
    shape: list[int] = Field(examples=[[2, 1, 4, 17, 17]])
    dtype: str = Field(description='numpy dtype name, "str" for strings', examples=["float16"])
    chunks: list[int] = Field(examples=[[1, 1, 4, 512, 512]])
    derived: bool = Field(description="computed from q and k on request (derived-attention bundles)")


class ArrayList(BaseModel):
    """A bundle's arrays. For a bulk job (format 2.x): those of one micro-batch, in the per-sequence
    form of sequence ``seq`` (no ``batch`` axis, rows cut to its length); ``sequences`` counts the
    job's sequences (finished so far while it runs)."""

    job_id: str
    format_version: str = Field(examples=["1.5"])
    bulk: bool
    sequences: int
    arrays: list[ArrayPublic]
    token_strings: list[str] | None = Field(
        default=None, description="the decoded tokens of sequence `seq`, when `?seq=` was given"
    )


class ArraySliceJson(BaseModel):
    """A slice as JSON (``format=json``): ``data`` nested lists of ``shape``; NaN and ±inf are null."""

    name: str
    dims: list[str]
    shape: list[int]
    dtype: str
    data: Any


class TilePyramidPublic(BaseModel):
    """The tile pyramid of one attention matrix: level 0 is the data (``tokens`` × ``tokens``, real
    tokens only); level ``L`` pools ``2**L × 2**L`` cells; the last level fits one tile."""

    tokens: int
    tile: int = Field(description="cells per side of a tile", examples=[256])
    levels: int
    level_sizes: list[list[int]] = Field(description="[rows, cols] of each level, level 0 first")
    pools: list[str] = Field(examples=[["max", "mean"]])
    ready: bool = Field(
        description="levels ≥ 1 are built and cached (else the first tile request builds them)"
    )
    token_strings: list[str]


def array_public(info: ArrayInfo) -> ArrayPublic:
    return ArrayPublic(
        name=info.name,
        group=info.group,
        dims=list(info.dims),
        shape=list(info.shape),
        dtype=info.dtype,
        chunks=list(info.chunks),
        derived=info.derived,
    )


def pyramid_public(info: PyramidInfo) -> TilePyramidPublic:
    return TilePyramidPublic(
        tokens=info.tokens,
        tile=info.tile,
        levels=info.levels,
        level_sizes=[[size, size] for size in info.level_sizes],
        pools=list(info.pools),
        ready=info.ready,
        token_strings=info.token_strings,
    )
