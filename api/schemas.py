"""Public response schemas. Separate from the index records (``storage.index``) and from the
request body (:class:`storage.jobs.spec.JobSpec`): what the API returns is decided here. The job document
is declared once in :mod:`storage.jobs.fields` (shared with the client); ``JobPublic`` is that model."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.index import ChunkRecord, JobRecord
from storage.jobs.estimate import JobEstimate as Estimate
from storage.jobs.fields import JobFields, JobLinks
from storage.jobs.spec import stored_spec


class JobPublic(JobFields):
    # The fields are declared once, in storage.jobs.fields (where a new one goes: see its docstring).
    __doc__ = JobFields.__doc__


class JobList(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last page")


class ChunkPublic(BaseModel):
    array: str = Field(examples=["attention"])
    coords: list[int] = Field(description="chunk grid coordinates", examples=[[0, 1, 0, 2, 0]])
    key: str = Field(description="store key relative to the bundle root", examples=["attention/c/0/1/0/2/0"])
    nbytes: int = Field(description="stored (encoded) size in bytes")
    checksum: str = Field(
        examples=["crc32c:e3069283"],
        description="<algorithm>:<hex> of the stored bytes: crc32c (the default) or sha256",
    )


class PresignedObject(BaseModel):
    key: str = Field(description="object key relative to the bundle root", examples=["attention/c/0/0/0/0/0"])
    nbytes: int = Field(description="stored size in bytes")
    url: str = Field(description="presigned HTTPS GET URL; no credentials needed until it expires")


class BundleUrls(BaseModel):
    """Presigned URLs of every object of a bundle on S3: fetch them with any HTTP client (no API
    key, no S3 credentials) into a directory ``<id>.zarr/<key>`` and open it with xarray."""

    job_id: str
    partial: bool = Field(description="the job was cancelled or failed and left partial data")
    expires_in: int = Field(description="lifetime of each URL in seconds")
    expires_at: datetime = Field(description="when the URLs stop working")
    total_bytes: int
    objects: list[PresignedObject]


class UploadPublic(BaseModel):
    """An uploaded source file of bulk jobs (``POST /v1/uploads``): reference it from a job as
    ``{"source": {"kind": "file", "upload": "<id>", "format": "jsonl", "field": "text"}}``."""

    id: str = Field(examples=["5f0c9a1e2b7d4c4f9a3e8d6b1c2f7a90"])
    state: Literal["complete", "pending"] = Field(
        description="complete: the file is stored; pending: a presigned upload whose PUT has not arrived"
    )
    nbytes: int | None = Field(description="size of the stored file (null while pending)")
    sha256: str | None = Field(
        description="SHA-256 of the file as the API received it (null for presigned uploads)"
    )
    filename: str | None = Field(None, description="the name the client gave (informative only)")
    created_at: datetime
    links: dict[str, str] = Field(examples=[{"self": "/v1/uploads/5f0c9a1e2b7d4c4f9a3e8d6b1c2f7a90"}])
    upload_url: str | None = Field(
        None, description="presigned upload only: PUT the file's bytes here (no API key) before expires_at"
    )
    upload_method: Literal["PUT"] | None = Field(None, description="presigned upload only: the HTTP method")
    expires_at: datetime | None = Field(
        None, description="presigned upload only: when upload_url stops working"
    )


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    checks: dict[str, str] | None = Field(default=None, examples=[{"database": "ok", "redis": "ok"}])


class ProblemDoc(BaseModel):
    """RFC 9457 problem document (documentation only: errors are built in :mod:`api.problems`)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["invalid-job-spec"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, str]] | None = Field(
        None,
        examples=[[{"loc": "body.generation.max_new_tokens", "msg": "...", "type": "greater_than_equal"}]],
    )


class ArrayEstimate(BaseModel):
    name: str = Field(examples=["attention"])
    dims: list[str] = Field(examples=[["layer", "batch", "head", "query", "key"]])
    shape: list[int]
    dtype: str = Field(examples=["float16"])
    chunk_shape: list[int]
    chunks_written: int = Field(description="chunks the worker will write (attention: up to the diagonal)")
    raw_bytes: int = Field(description="uncompressed bytes of the whole array as allocated")
    expected_stored_bytes: int = Field(description="expected encoded bytes on the store")


class TokenEstimate(BaseModel):
    prompt: list[int] = Field(description="tokens of each prompt")
    prompt_total: int
    max_new_tokens: int = Field(description="per prompt")
    max_total: int = Field(description="prompt tokens + max_new_tokens, summed over the prompts")
    positions: int = Field(description="allocated sequence axis: longest prompt + max_new_tokens")
    exact: bool = Field(description="counted with the model's tokenizer (false: approximated)")


class LimitCheck(BaseModel):
    name: str = Field(examples=["max_stored_bytes"])
    setting: str = Field(examples=["QKVAULT_MAX_STORED_BYTES"])
    limit: int
    value: int
    exceeded_by: int = Field(description="value - limit when over the limit, else 0")
    ok: bool


class BulkEstimate(BaseModel):
    """A bulk job as a whole, estimated from a sample of its source (docs/bulk-jobs.md, "Limits")."""

    sequences: int | None = Field(
        description="sequences the job exports (null: the source's size is unknown)"
    )
    sequences_exact: bool = Field(
        description="counted (inline sources, Parquet metadata, small files) or estimated"
    )
    sampled_rows: int = Field(description="rows of the source read for this estimate")
    sampled: str = Field(description="how the source was sampled")
    total_tokens: int = Field(description="prompt tokens + max_new_tokens over every sequence")
    micro_batches: int = Field(description="micro-batches, the sample's plan scaled to the job")
    padding_fraction: float = Field(description="padding of the sample's micro-batches")


class JobEstimate(BaseModel):
    """What a job will write, computed from the spec and the model's config without running it."""

    model: str = Field(description="model.id")
    arrays: list[ArrayEstimate]
    raw_bytes: int = Field(description="sum of the arrays' uncompressed bytes")
    expected_stored_bytes: int = Field(description="arrays + metadata, as stored (what the size limit sees)")
    expected_stored: str = Field(description="expected_stored_bytes in binary units", examples=["1.3 GiB"])
    metadata_bytes: int = Field(description="zarr.json files and root attributes (included above)")
    tokens: TokenEstimate
    attention_profile: str = Field(description="compression profile of attention: trained | near-uniform")
    upper_bound: bool = Field(description="sequences may stop early at EOS: the real bundle can be smaller")
    approximate: bool = Field(description="prompt token counts are approximated")
    assumptions: list[str]
    bulk: BulkEstimate | None = Field(None, description="a bulk job's whole-job figures (null otherwise)")
    model_allowed: bool = Field(description="model.id matches this server's QKVAULT_ALLOWED_MODELS")
    limits: list[LimitCheck] = Field(description="this server's limits, checked against the estimate")
    within_limits: bool = Field(description="a submission of this spec would pass every limit")


def human_bytes(n: int) -> str:
    """``53687091200`` → ``"50 GiB"``; ``1288490189`` → ``"1.2 GiB"``."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            break
        value /= 1024
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"


def estimate_public(
    est: Estimate, model_id: str, limits: list[LimitCheck], model_allowed: bool
) -> JobEstimate:
    data = est.to_dict()
    return JobEstimate(
        model=model_id,
        **data,
        expected_stored=human_bytes(est.expected_stored_bytes),
        model_allowed=model_allowed,
        limits=limits,
        within_limits=model_allowed and all(limit.ok for limit in limits),
    )


def job_links(job_id: str, root_path: str = "") -> JobLinks:
    base = f"{root_path.rstrip('/')}/v1/jobs/{job_id}"
    return {"self": base, "bundle": f"{base}/bundle", "cancel": f"{base}/cancel", "chunks": f"{base}/chunks"}


def job_public(job: JobRecord, root_path: str = "") -> JobPublic:
    """The record's public fields, its spec read leniently (a spec stored by another version never
    fails the read) and its links."""
    fields = job.public_fields()
    return JobPublic(**{**fields, "spec": stored_spec(job.spec), "links": job_links(job.id, root_path)})


def chunk_public(chunk: ChunkRecord) -> ChunkPublic:
    return ChunkPublic(
        array=chunk.array,
        coords=list(chunk.coords),
        key=chunk.key,
        nbytes=chunk.nbytes,
        checksum=chunk.checksum,
    )
