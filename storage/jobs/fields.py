"""The job as the outside sees it, declared once: :class:`JobFields` (and its :class:`Progress` and
:class:`JobLinks`) is the document ``GET /v1/jobs/{id}`` returns and the client reads.

Derived from it, not written out again:

- the API's ``JobPublic`` (:mod:`api.schemas`) *is* this model (response schema, OpenAPI docs);
- the client's ``Job`` (:mod:`qkvault.job`) subclasses it, adding lenient parsing and rendering;
- the mapper from the index (:meth:`storage.index.records.JobRecord.public_fields`) iterates these
  fields and copies each from the record field of the same name; only ``progress`` and ``links`` are
  computed (``links`` by the API, which knows its root path).

Where a new public field goes, and what follows:

1. a column on ``JobRow`` (storage/index/models.py) with an Alembic migration, and a field of the same
   name on ``JobRecord`` (storage/index/records.py) -- the row-to-record mapper copies it by name;
   ``tests/storage/test_index.py`` checks that row, migration, record and these fields agree;
2. the field here, **with a default**: a document from a server older than the field then still
   reads in a newer client (the default is what a reader assumes when the field is absent).
   The API's OpenAPI schema still lists every field as required (``json_schema_serialization_defaults
   _required``), because the API always sends them all.

Nothing else: the API response, the docs and the client pick it up. This module imports only pydantic,
so that the client (``qkvault``) can import it without the SQL index or the bundle reader.

The job **spec** is stored as the JSON submitted (validated strictly at submission, defaults filled
in) and shown as stored: :func:`storage.jobs.spec.stored_spec` reads it leniently, so a spec stored by
an older or newer version still lists and reads after ``JobSpec`` changes.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL_STATES: frozenset[JobState] = frozenset({JobState.CANCELLED, JobState.SUCCEEDED, JobState.FAILED})

# A state is read as a plain string, so that a reader older than a new state still reads the job;
# the schema lists today's states.
StateName = Annotated[str, WithJsonSchema({"type": "string", "enum": [s.value for s in JobState]})]

_CONFIG = ConfigDict(json_schema_serialization_defaults_required=True)


class Progress(BaseModel):
    model_config = _CONFIG

    units_done: int = Field(0, description="work units finished (e.g. layer x row-block writes)")
    units_total: int = Field(0, description="work units planned; 0 until the worker has planned the job")
    fraction: float | None = Field(None, description="units_done / units_total in [0, 1]; null while unknown")
    tokens_done: int = Field(
        0, description="bulk jobs: real tokens (prompt + new) of the finished micro-batches"
    )
    tokens_total: int = Field(
        0,
        description="bulk jobs: tokens expected, estimated at submission from a sample of the source and "
        "exact once the job ends; 0 when unknown (and for one-batch jobs)",
    )
    bytes_written: int = Field(0, description="encoded bytes written to the store so far")
    chunks_written: int = Field(0, description="chunks durably written and recorded in the index")


class JobLinks(TypedDict, total=False):
    """URLs of this job and of what can be done with it (the API always sends all four)."""

    self: str
    bundle: str
    cancel: str
    chunks: str


class JobFields(BaseModel):
    """A job as the API shows it. Poll ``links.self`` until ``state`` is terminal, then download
    ``links.bundle``."""

    model_config = _CONFIG

    id: str
    owner: str = Field("", description="owner of the API key that submitted it")
    state: StateName
    label: str | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = Field(0, description="worker attempts so far (a redelivered job counts again)")
    max_attempts: int = 0
    heartbeat_at: datetime | None = Field(None, description="last sign of life from the worker running it")
    phase: str | None = Field(None, description='e.g. "loading_model", "prefill", "decoding", "finalizing"')
    progress: Progress = Field(default_factory=Progress)
    error: dict[str, Any] | None = Field(
        None,
        description="problem document (type, title, detail) if it failed; a job given back after "
        "a store failure (store down, disk full, not writable) shows that failure with "
        '`"retrying": true` until it ends',
    )
    partial: bool = Field(
        False, description="a cancelled/failed job left readable partial data in its bundle"
    )
    cancel_requested: bool = False
    result: dict[str, Any] | None = Field(None, description="small summary written when the job ends")
    links: JobLinks = Field(default_factory=lambda: JobLinks())
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="the job spec as submitted (the body of POST /v1/jobs, defaults filled in); "
        "a spec stored by another version of qkvault is shown as stored",
    )

    @property
    def terminal(self) -> bool:
        """True once the job can change no more (succeeded, failed or cancelled)."""
        return self.state in TERMINAL_STATES


# The fields computed when a job is shown, rather than copied from the index record.
COMPUTED_FIELDS = frozenset({"progress", "links"})
