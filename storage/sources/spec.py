"""The ``source`` of a bulk job: which sequences it exports, from where, and how they are batched.

A job has either inline ``prompts`` (one padded batch, bundle format 1.x) or a ``source`` (a bulk
job: sequences streamed in micro-batches, bundle format 2.x). Kinds:

- ``prompts``: inline texts;
- ``token_ids``: inline pre-tokenised sequences (exact ids, no tokenizer);
- ``file``: an uploaded JSONL (a named field), Parquet (a named column) or plain-text (one prompt per
  line) file, referenced by its upload id;
- ``dataset``: a Hugging Face dataset read from the worker's local datasets cache or a local path,
  streamed (``load_dataset(path, name, split=split, streaming=True)``), one named column.

A file's field or a dataset's column may hold texts or lists of token ids. ``offset``, ``limit``
and a seeded buffer ``shuffle`` select the rows; chat template and special-token options of the
job apply to every text row.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.inputs import MAX_SEED, utf8, utf8_text

FileFormat = Literal["jsonl", "parquet", "text"]
MAX_INLINE_SEQUENCES = 100_000
DEFAULT_TOKEN_BUDGET = 16_384
DEFAULT_MAX_SEQUENCES = 64
DEFAULT_SHUFFLE_BUFFER = 10_000


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    offset: int = Field(0, ge=0, le=2**40, description="rows of the source skipped first")
    limit: int | None = Field(None, ge=1, le=2**40, description="at most this many rows after offset")
    shuffle_seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="shuffle the rows (after offset/limit) with this seed, through a buffer of "
        "shuffle_buffer rows, as streamed datasets do; the same seed gives the same order",
    )
    shuffle_buffer: int = Field(DEFAULT_SHUFFLE_BUFFER, ge=1, le=1_000_000)
    token_budget: int = Field(
        DEFAULT_TOKEN_BUDGET,
        ge=1,
        le=2**24,
        description="at most this many tokens (prompt + new tokens, padding included) per micro-batch",
    )
    max_sequences: int = Field(DEFAULT_MAX_SEQUENCES, ge=1, le=4096, description="sequences per micro-batch")


class PromptsSource(_Source):
    kind: Literal["prompts"]
    prompts: list[str] = Field(min_length=1, max_length=MAX_INLINE_SEQUENCES)

    @field_validator("prompts")
    @classmethod
    def _texts(cls, value: list[str]) -> list[str]:
        for i, prompt in enumerate(value):
            if not prompt:
                raise ValueError(f"source.prompts[{i}] is empty: every prompt needs at least one character")
            utf8_text(prompt, f"source.prompts[{i}]")
        return value


class TokenIdsSource(_Source):
    kind: Literal["token_ids"]
    token_ids: list[list[Annotated[int, Field(ge=0, le=2**31 - 1)]]] = Field(
        min_length=1, max_length=MAX_INLINE_SEQUENCES
    )

    @field_validator("token_ids")
    @classmethod
    def _not_empty(cls, value: list[list[int]]) -> list[list[int]]:
        for i, ids in enumerate(value):
            if not ids:
                raise ValueError(f"source.token_ids[{i}] is empty: every sequence needs at least one token")
        return value


class FileSource(_Source):
    kind: Literal["file"]
    upload: Annotated[str, utf8("source.upload", nul=False)] = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="id from POST /v1/uploads"
    )
    format: FileFormat
    field: Annotated[str, utf8("source.field", nul=False)] | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="JSONL field / Parquet column holding each row's text or token ids (default "
        "`text`); not for the text format (one prompt per line)",
    )

    @model_validator(mode="after")
    def _field_for_records(self) -> FileSource:
        if self.format == "text" and self.field is not None:
            raise ValueError(
                "source.field is for jsonl and parquet files: a text file has one prompt per line; "
                "leave field out, or use format jsonl"
            )
        return self


class DatasetSource(_Source):
    kind: Literal["dataset"]
    path: Annotated[str, utf8("source.path", nul=False)] = Field(min_length=1, max_length=512)
    name: Annotated[str, utf8("source.name", nul=False)] | None = Field(None, max_length=256)
    split: Annotated[str, utf8("source.split", nul=False)] = Field("train", min_length=1, max_length=256)
    column: Annotated[str, utf8("source.column", nul=False)] = Field(min_length=1, max_length=256)


SourceSpec = Annotated[
    PromptsSource | TokenIdsSource | FileSource | DatasetSource, Field(discriminator="kind")
]
