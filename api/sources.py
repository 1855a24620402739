"""Admission of a bulk job's ``source``: what can be known about it before a worker reads it
(docs/bulk-jobs.md). Called by :func:`api.admission.assess`.

- ``file``: the upload exists, belongs to the caller and has arrived (else 422 naming
  ``source.upload``); its first :data:`SAMPLE_ROWS` rows are read as the worker will read them, so
  a wrong format, a missing field or column, an empty file, or a first row that is neither text nor
  token ids is a 422 naming the row. Its size is checked against ``QKVAULT_MAX_UPLOAD_BYTES`` by the
  caller (a presigned upload may have sent more).
- ``dataset``: a path outside the datasets folder (``QKVAULT_DATASETS_DIR``) is refused (422). When
  the package ``datasets`` is installed here and the dataset is in this host's datasets folder, its
  first rows are read the same way; otherwise the job is admitted and the worker checks the dataset
  (a failed job whose error names the problem).
- inline ``prompts`` / ``token_ids``: counted against ``QKVAULT_MAX_SEQUENCES``
  (:func:`inline_sequences`; the limit itself is an :class:`api.admission.Limit`).

Then :func:`sample` reads a sample spread over the source (:mod:`storage.sources.sample`) for the
whole job's estimate and limits (sequences, tokens, stored bytes). Rows further in are checked by the
worker as it streams them.
"""

from __future__ import annotations

import importlib.util
import itertools

from api.settings import ApiSettings
from storage.errors import InvalidJobSpec
from storage.sources.hfdatasets import DatasetNotFound, dataset_folder
from storage.sources.readers import read_rows
from storage.sources.rows import SourceContext
from storage.sources.sample import SourceSample, sample_source
from storage.sources.spec import DatasetSource, FileSource, PromptsSource, SourceSpec, TokenIdsSource
from storage.stores.objectstore import ObjectStore
from storage.stores.uploads import UploadRecord, read_upload

SAMPLE_ROWS = 100


def inline_sequences(source: SourceSpec) -> tuple[str, int] | None:
    """``(field, count)`` of an inline source's sequences; None for files and datasets."""
    if isinstance(source, PromptsSource):
        return "prompts", len(source.prompts)
    if isinstance(source, TokenIdsSource):
        return "token_ids", len(source.token_ids)
    return None


def check_source(
    source: SourceSpec, settings: ApiSettings, store: ObjectStore | None, owner: str | None
) -> UploadRecord | None:
    """Raise :class:`InvalidJobSpec` (422) for a source that cannot run (module docstring); return
    the upload of a ``file`` source."""
    if isinstance(source, FileSource):
        if store is None or owner is None:
            raise RuntimeError("admission of a file source needs the object store and the caller")
        upload = _upload(source, store, owner)
        _sample(source, SourceContext(store=store, datasets_dir=settings.datasets_dir, owner=owner))
        return upload
    if isinstance(source, DatasetSource):
        try:
            dataset_folder(source, settings.datasets_dir)  # outside the datasets folder: 422 here
        except DatasetNotFound:
            return None  # not on this host: the worker checks it
        if importlib.util.find_spec("datasets") is None:
            return None
        try:
            _sample(source, SourceContext(datasets_dir=settings.datasets_dir))
        except DatasetNotFound:
            return None
    return None


def sample(
    source: SourceSpec, settings: ApiSettings, store: ObjectStore | None, owner: str | None
) -> SourceSample | None:
    """A sample of the source for the whole job's estimate, or None when it cannot be read here (a
    dataset not on this host, or without the ``datasets`` package): the worker checks it."""
    context = SourceContext(store=store, datasets_dir=settings.datasets_dir, owner=owner)
    if isinstance(source, DatasetSource):
        if importlib.util.find_spec("datasets") is None:
            return None
        try:
            dataset_folder(source, settings.datasets_dir)
            return sample_source(source, context)
        except DatasetNotFound:
            return None
    return sample_source(source, context)


def _upload(source: FileSource, store: ObjectStore, owner: str) -> UploadRecord:
    record = read_upload(store, owner, source.upload)
    if record is None:
        raise InvalidJobSpec(
            f"source.upload {source.upload!r}: no such upload of yours (uploads are per owner); upload the "
            "file first with POST /v1/uploads (qkvault submit --prompts-file) using the same API key",
            detail={"field": "source.upload"},
        )
    if not record.complete:
        raise InvalidJobSpec(
            f"source.upload {source.upload!r} is pending: its file has not arrived; PUT the file to the "
            "presigned upload_url first (GET /v1/uploads/{id} shows when it is complete)",
            detail={"field": "source.upload"},
        )
    return record


def _sample(source: FileSource | DatasetSource, context: SourceContext) -> None:
    """Read the source's first rows (SourceRowError, a 422, for the first bad one)."""
    rows = read_rows(source, context)
    try:
        for _ in itertools.islice(rows, SAMPLE_ROWS):
            pass
    finally:
        rows.close()
