"""The rows of a ``dataset`` source: a Hugging Face dataset on this machine's disk, streamed with
``datasets.load_dataset(folder, name, split=split, streaming=True)``; nothing is downloaded.

``source.path`` names a folder under the datasets folder (``QKVAULT_DATASETS_DIR``, else this
process's Hugging Face hub cache; :func:`dataset_folder`):

- ``org/name`` (any relative path): the folder ``<datasets dir>/org/name``, as ``hf download
  --repo-type dataset org/name --local-dir <datasets dir>/org/name`` makes it, or a folder of data
  files (JSON lines, Parquet, CSV, text: whatever ``datasets`` reads from a local folder);
- else the hub-cache layout of the same id, ``<datasets dir>/datasets--org--name/snapshots/<rev>``
  (``refs/main``), as ``hf download --repo-type dataset org/name`` leaves it in the hub cache;
- an absolute path: a folder inside the datasets folder (symlinks resolved).

A path outside the datasets folder is refused whether or not it exists (the same message either
way), as model paths outside the model roots are. ``name`` is the dataset's configuration (its
README's ``configs``), ``split`` one of its splits, ``column`` the column holding each row's text
or token ids.

``datasets`` would import torch when it is installed (a shared-memory epoch counter for torch's
DataLoader workers, unused here): a process that has not imported torch (the API) reads without it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage.errors import ServerMisconfigured
from storage.inputs import path_like
from storage.settings import huggingface_hub_cache
from storage.sources.rows import RawRow, SourceContext, SourceRowError, row_value
from storage.sources.spec import DatasetSource

__all__ = ["DatasetNotFound", "dataset_folder", "dataset_rows", "split_rows"]

DATASETS_SETTING = "QKVAULT_DATASETS_DIR"


class DatasetNotFound(SourceRowError):
    """The dataset is not on this machine (the API admits the job then: the worker may have it)."""


def _inside(path: Path, root: Path) -> bool:
    return path != root and path.is_relative_to(root)


def _hub_snapshot(root: Path, repo_id: str) -> Path | None:
    """The snapshot folder of dataset ``repo_id`` in a hub cache at ``root`` (``refs/main``, else its
    only snapshot), or None."""
    repo = root / f"datasets--{repo_id.strip('/').replace('/', '--')}"
    ref = repo / "refs" / "main"
    try:
        if ref.is_file():
            return repo / "snapshots" / ref.read_text().strip()
        snapshots = sorted(p for p in (repo / "snapshots").glob("*") if p.is_dir())
    except OSError:  # e.g. a name too long for the file system: not there
        return None
    return snapshots[0] if len(snapshots) == 1 else None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def dataset_folder(source: DatasetSource, datasets_dir: Path | None) -> Path:
    """The folder of ``source.path`` under ``datasets_dir`` (None: the hub cache). Raises
    :class:`SourceRowError` for a path outside it, :class:`DatasetNotFound` when it is not there."""
    try:
        path_like(source.path, "source.path")
    except ValueError as exc:
        raise SourceRowError(str(exc), detail={"field": "source.path"}) from None
    root = Path(datasets_dir or huggingface_hub_cache()).expanduser().resolve()
    where = f"the datasets folder {root} ({DATASETS_SETTING})"
    raw = Path(source.path)
    candidates = [raw] if raw.is_absolute() else [root / raw]
    if not raw.is_absolute() and (snapshot := _hub_snapshot(root, source.path)) is not None:
        candidates.append(snapshot)
    for candidate in candidates:
        resolved = candidate.resolve()
        if not _inside(resolved, root):
            raise SourceRowError(
                f"dataset path {source.path!r} is not inside {where}: put the dataset there (e.g. hf "
                f"download --repo-type dataset org/name --local-dir {root}/org/name) and give its path "
                "relative to that folder",
                detail={"field": "source.path"},
            )
        if _exists(resolved):
            return resolved
    raise DatasetNotFound(
        f"dataset {source.path!r} not found in {where}: download it there beforehand (hf download "
        f"--repo-type dataset {source.path} --local-dir {root}/{source.path}); workers read datasets "
        "from their disk only",
        detail={"field": "source.path"},
    )


def _datasets_module() -> Any:
    try:
        import datasets
    except ImportError:
        raise ServerMisconfigured(
            "dataset sources need the Python package 'datasets', which is not installed in this "
            "process's environment; install it (pip install 'qkvault[worker]')",
            detail={"missing_package": "datasets"},
        ) from None
    if "torch" not in sys.modules:  # read without importing torch (module docstring)
        datasets.config.TORCH_AVAILABLE = False
    return datasets


def _load(source: DatasetSource, folder: Path) -> Any:
    datasets = _datasets_module()
    config = f", configuration {source.name!r}" if source.name else ""
    cache = os.path.join(tempfile.gettempdir(), "qkvault-datasets-cache")  # locks only: streaming
    try:
        return datasets.load_dataset(
            str(folder), source.name, split=source.split, streaming=True, cache_dir=cache
        )
    except StopIteration:  # raised by datasets' JSON builder for an empty split
        raise SourceRowError(
            f"dataset {source.path!r}{config}, split {source.split!r} has no rows: the source is empty",
            detail={"field": "source"},
        ) from None
    except Exception as exc:  # whatever datasets raises for a folder it cannot read: name it
        text = str(exc)
        field = (
            "source.split" if "split" in text.lower() else "source.name" if "config" in text.lower() else None
        )
        raise SourceRowError(
            f"dataset {source.path!r}{config}, split {source.split!r}: cannot be read ({type(exc).__name__}: "
            f"{text[:500]})",
            detail={"field": field or "source.path"},
        ) from None


def dataset_rows(source: DatasetSource, context: SourceContext) -> Iterator[RawRow]:
    """(row, text, token ids) of every row of the dataset's split, streamed."""
    folder = dataset_folder(source, context.datasets_dir)
    dataset = _load(source, folder)
    what = f"dataset {source.path!r}, split {source.split!r}"
    columns = dataset.column_names
    if columns is not None and source.column not in columns:
        raise SourceRowError(
            f"{what} has no column {source.column!r}; its columns: {', '.join(repr(c) for c in columns)}",
            detail={"field": "source.column"},
        )
    records = iter(dataset)
    row = 0
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:  # a data file datasets cannot parse: name where it stopped
            raise SourceRowError(
                f"{what}: reading row {row} failed ({type(exc).__name__}: {str(exc)[:500]})",
                detail={"field": "source", "row": row},
            ) from None
        if source.column not in record:
            raise SourceRowError(
                f"{what} row {row} has no column {source.column!r}; its columns: "
                f"{', '.join(repr(c) for c in record)}",
                detail={"field": "source.column", "row": row},
            )
        text, ids = row_value(record[source.column], f"{what} row {row}, column {source.column!r}", row)
        yield row, text, ids
        row += 1


def split_rows(source: DatasetSource, folder: Path) -> int | None:
    """The split's row count as the dataset records it (``info.splits``; a hub dataset's card), or
    None when it is not recorded (data files without metadata)."""
    splits = getattr(_load(source, folder).info, "splits", None)
    if not splits or source.split not in splits:
        return None
    count = splits[source.split].num_examples
    return int(count) if count else None
