"""Jobs with bundles for the slice and tile API tests: a submitted job, claimed as a worker would,
its bundle written at its store URL by the real writer (bench/synthetic.py), then finished."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench.synthetic import SyntheticBundle, write_bulk_bundle, write_bundle
from storage.index import Index, JobState

Submit = Callable[..., dict[str, Any]]


def finished_job(
    submit: Submit,
    index: Index,
    spec: SyntheticBundle,
    *,
    bulk: Sequence[Sequence[int]] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[str, Any]:
    """A succeeded job whose bundle is ``spec`` (a bulk bundle of micro-batches ``bulk``); returns
    its id and what was written."""
    job_id = submit()["id"]
    job = index.claim(job_id, "worker-1")
    assert job is not None
    if bulk is None:
        written: Any = write_bundle(job.store_url, spec, storage_options=storage_options)
    else:
        written = write_bulk_bundle(job.store_url, spec, bulk, storage_options=storage_options)
    index.finish(job_id, JobState.SUCCEEDED)
    return job_id, written


def load_npy(body: bytes) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(body), allow_pickle=False)
    return array
