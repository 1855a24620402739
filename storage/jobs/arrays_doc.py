"""The array table of docs/bundle-format.md, generated from the array declarations
(:data:`storage.bundle.arrays.ARRAYS`).

The table lives between :data:`BEGIN` and :data:`END`; ``python scripts/array_table.py --write``
regenerates it and tests/storage/test_array_registry.py fails when it drifts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import get_args

from storage.bundle.arrays import ARRAYS, ArraySpec
from storage.jobs.spec import StorageDtype, StorageSpec
from storage.settings_doc import generated_part, with_table

BEGIN = (
    "<!-- BEGIN array table: generated from the declarations in storage/bundle/arrays.py by "
    "`python scripts/array_table.py --write`; do not edit by hand -->"
)
END = "<!-- END array table -->"
HEADER = ("array", "dims", "dtype", "fill", "chunk", "captured with", "since", "meaning")


def _dims(spec: ArraySpec) -> str:
    text = "(" + ", ".join(spec.dims) + ")"
    renames = [f"`{r.to}` for `{r.dim}` with {r.condition}" for r in spec.renames]
    return "; ".join([text, *renames])


def _dtype(spec: ArraySpec) -> str:
    if spec.dtype_setting is None:
        return "string" if spec.dtype == "str" else spec.dtype
    default = StorageSpec.model_fields[spec.dtype_setting].default
    choices = [default, *(d for d in get_args(StorageDtype) if d != default)]
    return " / ".join(choices) + f" (`storage.{spec.dtype_setting}`)"


def _fill(value: int | float | str) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return "NaN" if isinstance(value, float) and math.isnan(value) else str(value)


def _chunk(spec: ArraySpec) -> str:
    if spec.chunking == "whole":
        return "whole"
    extents = {1: "1", "rows": "R", "whole": ""}
    return "(" + ", ".join(extents[spec.chunk_extent(d)] or d for d in spec.dims) + ")"


def _meaning(spec: ArraySpec) -> str:
    return "; ".join(part for part in (spec.description, spec.details) if part)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_array_table(specs: Iterable[ArraySpec] = ARRAYS.values()) -> str:
    """The markdown table (no trailing newline), one row per array in creation order."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for spec in specs:
        cells = (
            f"`{spec.name}`",
            _dims(spec),
            _dtype(spec),
            _fill(spec.fill_value),
            _chunk(spec),
            spec.produced_by,
            spec.since,
            _meaning(spec),
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def array_table_of(document: str) -> str:
    """The generated table in ``document`` (between the markers)."""
    return generated_part(document, begin=BEGIN, end=END)


def with_array_table(document: str, table: str) -> str:
    """``document`` with its array table replaced by ``table``."""
    return with_table(document, table, begin=BEGIN, end=END)
