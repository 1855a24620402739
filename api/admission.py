"""Checks a job spec must pass before it is stored and queued: the model allowlist, server limits,
the model's shape, then the job's size (docs/estimates.md).

Model checks read only config.json / GGUF metadata (no weights, no torch); token counts use the
model's ``tokenizer.json`` when readable here (``tokenizers``, no transformers). When the model's
facts cannot be read here (e.g. a hub model absent from this machine's cache) the size of the job
is unknown: it is admitted and the worker checks the model later — unless the workers' Hugging
Face cache is visible here (``QKVAULT_HUB_CACHE_DIR``): then a hub id missing from it is refused.
An absolute path outside the model roots (``QKVAULT_MODEL_ROOTS``) is refused before anything is
read, with one message whatever exists there (:mod:`storage.models.roots`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from api.placement import check_placement
from api.problems import LIMIT_EXCEEDED, ApiProblem, field_error
from api.schemas import LimitCheck, human_bytes
from api.settings import ApiSettings
from api.sources import check_source, inline_sequences, sample
from storage.errors import InvalidJobSpec, QkvaultError, ServerMisconfigured
from storage.jobs.bulkestimate import estimate_bulk, job_tokens, sample_lengths
from storage.jobs.estimate import JobEstimate, count_prompt_tokens, estimate
from storage.jobs.modelcheck import check_spec_for_model
from storage.jobs.spec import JobSpec
from storage.models.facts import (
    ModelFacts,
    check_supported,
    hub_model_cached,
    hub_not_cached_message,
    read_facts,
    resolve_source,
    tokenizer_file,
)
from storage.sources.sample import SourceSample
from storage.sources.spec import SourceSpec
from storage.stores.objectstore import ObjectStore
from storage.stores.uploads import UploadRecord

MODEL_NOT_ALLOWED = "model-not-allowed"
ESTIMATE_UNAVAILABLE = "estimate-unavailable"
MODEL_NOT_CACHED = "model-not-cached"
_SIZE_HINT = (
    "export fewer layers/heads (capture.layers, capture.heads), select rows (capture.query_rows, "
    "capture.generation_steps), use fewer or shorter prompts, or use capture.detail=summary"
)


@dataclass(frozen=True)
class Limit:
    """One server limit compared with a job's value."""

    name: str
    setting: str
    loc: str
    what: str
    value: int
    limit: int
    hint: str = ""
    unit: str = ""  # "bytes": shown in binary units
    note: str = ""  # how the value was computed

    @property
    def exceeded_by(self) -> int:
        return max(0, self.value - self.limit)

    def _show(self, n: int) -> str:
        return human_bytes(n) if self.unit == "bytes" else str(n)

    def message(self) -> str:
        note = f" ({self.note})" if self.note else ""
        msg = (
            f"{self.what} {self._show(self.value)}{note} exceeds this server's limit of "
            f"{self._show(self.limit)} ({self.setting}) by {self._show(self.exceeded_by)}"
        )
        return f"{msg}; {self.hint}" if self.hint else msg

    def problem(self) -> ApiProblem:
        msg = self.message()
        return ApiProblem(
            422,
            LIMIT_EXCEEDED,
            msg,
            title="Server limit exceeded",
            errors=[field_error(self.loc, msg, "limit_exceeded")],
            extensions={
                "limit": self.limit,
                "value": self.value,
                "exceeded_by": self.exceeded_by,
                "setting": self.setting,
            },
        )

    def public(self) -> LimitCheck:
        return LimitCheck(
            name=self.name,
            setting=self.setting,
            limit=self.limit,
            value=self.value,
            exceeded_by=self.exceeded_by,
            ok=self.exceeded_by == 0,
        )


@dataclass
class Admission:
    """What admission learnt about a spec: the limits checked so far and the size estimate."""

    facts: ModelFacts | None = None
    estimate: JobEstimate | None = None
    limits: list[Limit] = field(default_factory=list)
    model_allowed: bool = True
    bulk_tokens: int = 0  # a bulk job's tokens, estimated from a sample of its source (0: unknown)

    def check(self, limit: Limit, enforce: bool) -> None:
        self.limits.append(limit)
        if enforce and limit.exceeded_by:
            raise limit.problem()


def model_allowed(spec: JobSpec, settings: ApiSettings) -> bool:
    patterns = settings.allowed_models
    return not patterns or any(fnmatchcase(spec.model.id, pattern) for pattern in patterns)


def check_allowed(spec: JobSpec, settings: ApiSettings) -> None:
    if not model_allowed(spec, settings):
        raise ApiProblem(
            403,
            MODEL_NOT_ALLOWED,
            f"model {spec.model.id!r} is not allowed on this server: QKVAULT_ALLOWED_MODELS permits only "
            f"{', '.join(settings.allowed_models)}; use one of those models",
            title="Model not allowed",
            errors=[field_error("body.model.id", "model not on this server's allowlist", "not_allowed")],
            extensions={"allowed_models": list(settings.allowed_models)},
        )


def _count_limits(spec: JobSpec, settings: ApiSettings) -> list[Limit]:
    if spec.source is not None:  # a bulk job: its inline sequences, if any (files: api/sources.py)
        return [*_sequence_limits(spec.source, settings), _new_tokens_limit(spec, settings)]
    prompts = Limit(
        "max_prompts",
        "QKVAULT_MAX_PROMPTS",
        "body.prompts",
        "number of prompts",
        len(spec.inline_prompts),
        settings.max_prompts,
        "split the prompts over several jobs, or send them as a bulk job's source",
    )
    return [prompts, _new_tokens_limit(spec, settings)]


def _new_tokens_limit(spec: JobSpec, settings: ApiSettings) -> Limit:
    return Limit(
        "max_new_tokens",
        "QKVAULT_MAX_NEW_TOKENS",
        "body.generation.max_new_tokens",
        "generation.max_new_tokens",
        spec.generation.max_new_tokens,
        settings.max_new_tokens,
    )


def _sequence_limits(source: SourceSpec, settings: ApiSettings) -> list[Limit]:
    inline = inline_sequences(source)
    if inline is None:
        return []
    name, count = inline
    return [
        Limit(
            "max_sequences",
            "QKVAULT_MAX_SEQUENCES",
            f"body.source.{name}",
            f"number of inline sequences (source.{name})",
            count,
            settings.max_sequences,
            "upload them as a file (POST /v1/uploads, qkvault submit --prompts-file) and use a file source",
        )
    ]


def _upload_limit(upload: UploadRecord, settings: ApiSettings) -> Limit:
    return Limit(
        "max_upload_bytes",
        "QKVAULT_MAX_UPLOAD_BYTES",
        "body.source.upload",
        f"uploaded file {upload.id}",
        upload.nbytes or 0,
        settings.max_upload_bytes,
        "split the file over several uploads and jobs",
        unit="bytes",
    )


def check_limits(spec: JobSpec, settings: ApiSettings) -> None:
    for limit in _count_limits(spec, settings):
        if limit.exceeded_by:
            raise limit.problem()


def check_hub_cached(spec: JobSpec, hub_cache_dir: Path | None) -> None:
    """With the workers' hub cache visible here (``QKVAULT_HUB_CACHE_DIR``): 422 ``model-not-cached``
    for a hub id missing from it, which the workers would fail to load."""
    source = resolve_source(spec.model)
    if source.kind != "hub" or hub_cache_dir is None or hub_model_cached(source, hub_cache_dir):
        return
    if importlib.util.find_spec("huggingface_hub") is None:
        raise ServerMisconfigured(
            "QKVAULT_HUB_CACHE_DIR is set but the Python package 'huggingface-hub' is not installed on "
            "this API server, so its cache cannot be read; install it (pip install 'qkvault[api]')",
            detail={"missing_package": "huggingface-hub"},
        )
    cache = str(hub_cache_dir)
    where = f"the workers' Hugging Face cache ({cache}, QKVAULT_HUB_CACHE_DIR) that they load hub models from"
    msg = hub_not_cached_message(spec.model.id, source, cache, where)
    raise ApiProblem(
        422,
        MODEL_NOT_CACHED,
        msg,
        title="Model not in the workers' cache",
        errors=[
            field_error("body.model.id", "hub model not in the workers' Hugging Face cache", "not_cached")
        ],
        extensions={"hub_cache_dir": str(hub_cache_dir)},
    )


def check_model(
    spec: JobSpec, hub_cache_dir: Path | None = None, roots: Sequence[Path] | None = None
) -> ModelFacts | None:
    """Raise :class:`InvalidJobSpec`/:class:`UnsupportedModel` (422) if the model cannot run this
    spec (a path outside ``roots`` among them, whatever exists there; or ``model-not-cached``,
    :func:`check_hub_cached`); return its facts, or ``None`` when they cannot be read here."""
    resolve_source(spec.model, roots)  # the model roots first: nothing is read for a refused path
    check_hub_cached(spec, hub_cache_dir)
    try:
        facts = read_facts(spec.model, hub_cache_dir, roots)
    except QkvaultError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidJobSpec(
            f"model {spec.model.id!r}: cannot read its config or GGUF metadata "
            f"({type(exc).__name__}: {exc}); check the path/file or use another model",
            detail={"field": "model.id"},
        ) from exc
    if facts is None:
        return None
    check_supported(facts)
    check_spec_for_model(spec, facts)
    return facts


def _check_lengths(spec: JobSpec, facts: ModelFacts, prompt_lengths: list[int]) -> None:
    """What the worker would refuse after loading the model: a prompt too long for it."""
    new = spec.generation.max_new_tokens
    for i, n in enumerate(prompt_lengths):
        if facts.max_positions is not None and n + new > facts.max_positions:
            raise InvalidJobSpec(
                f"prompt {i} is too long for the model: {n} tokens + max_new_tokens {new} = {n + new} "
                f"positions, but the model supports {facts.max_positions}; shorten the prompt or lower "
                "max_new_tokens",
                detail={"field": "prompts"},
            )


def assess(
    spec: JobSpec,
    settings: ApiSettings,
    *,
    enforce: bool = True,
    store: ObjectStore | None = None,
    owner: str | None = None,
) -> Admission:
    """Run every check. ``enforce``: raise the first limit exceeded (submission); otherwise only
    record the limits (``POST /v1/jobs/estimate``). Invalid specs raise either way. ``store`` and
    ``owner`` (the caller): where a bulk job's uploaded file is looked up (:mod:`api.sources`)."""
    result = Admission(model_allowed=model_allowed(spec, settings))
    if enforce:
        check_allowed(spec, settings)
    for limit in _count_limits(spec, settings):
        result.check(limit, enforce)
    roots = settings.model_root_dirs()
    result.facts = check_model(spec, settings.hub_cache_dir, roots)
    tokenizer_json = tokenizer_file(spec.model, settings.model_cache_dir, settings.hub_cache_dir, roots)
    if spec.source is not None:
        upload = check_source(spec.source, settings, store, owner)
        if upload is not None:
            result.check(_upload_limit(upload, settings), enforce)
        _assess_bulk(
            spec, settings, result, enforce, sample(spec.source, settings, store, owner), tokenizer_json
        )
        return result
    prompt_lengths, exact = count_prompt_tokens(spec, tokenizer_json)
    tokens = Limit(
        "max_total_tokens",
        "QKVAULT_MAX_TOTAL_TOKENS",
        "body.prompts",
        "total tokens",
        sum(prompt_lengths) + spec.generation.max_new_tokens * len(prompt_lengths),
        settings.max_total_tokens,
        "shorten the prompts, send fewer prompts, or lower generation.max_new_tokens",
        note=f"prompt tokens + max_new_tokens over {len(prompt_lengths)} prompt(s); "
        + ("counted with the model's tokenizer" if exact else "approximated, no tokenizer readable here"),
    )
    result.check(tokens, enforce)
    if result.facts is None:
        return result
    if exact:
        _check_lengths(spec, result.facts, prompt_lengths)
    result.estimate = estimate(spec, result.facts, prompt_lengths, exact)
    size = Limit(
        "max_stored_bytes",
        "QKVAULT_MAX_STORED_BYTES",
        "body.capture",
        "expected stored size",
        result.estimate.expected_stored_bytes,
        settings.max_stored_bytes,
        _SIZE_HINT,
        unit="bytes",
    )
    result.check(size, enforce)
    return result


def _assess_bulk(
    spec: JobSpec,
    settings: ApiSettings,
    result: Admission,
    enforce: bool,
    found: SourceSample | None,
    tokenizer_json: str | None,
) -> None:
    """A bulk job's whole-job limits and estimate, from a sample of its source (None: a dataset
    this host cannot read; the worker checks the limits as it reads)."""
    assert spec.source is not None
    if found is None or not found.rows:
        return
    lengths, exact = sample_lengths(spec, found, tokenizer_json)
    _, tokens = job_tokens(found, lengths, spec.generation.max_new_tokens)
    if found.sequences is not None:
        result.bulk_tokens = tokens
    how = "counted" if found.exact else f"estimated from {len(lengths):,} sampled rows"
    if found.sequences is not None and inline_sequences(spec.source) is None:  # inline: counted already
        result.check(
            Limit(
                "max_sequences",
                "QKVAULT_MAX_SEQUENCES",
                "body.source",
                "number of sequences",
                found.sequences,
                settings.max_sequences,
                "select fewer rows with source.limit (and source.offset), or split the source over jobs",
                note=f"{how}: {found.how}",
            ),
            enforce,
        )
    if found.sequences is not None:
        counted = (
            "counted with the model's tokenizer" if exact else "approximated, no tokenizer readable here"
        )
        result.check(
            Limit(
                "max_job_tokens",
                "QKVAULT_MAX_JOB_TOKENS",
                "body.source",
                "total tokens of the job",
                tokens,
                settings.max_job_tokens,
                "select fewer rows with source.limit, or lower generation.max_new_tokens",
                note=f"prompt tokens + max_new_tokens over {found.sequences:,} sequences, {how}; {counted}",
            ),
            enforce,
        )
    if result.facts is None:
        return
    result.estimate = estimate_bulk(spec, result.facts, found, lengths, exact)
    if found.sequences is None:
        return
    result.check(
        Limit(
            "max_stored_bytes",
            "QKVAULT_MAX_STORED_BYTES",
            "body.capture",
            "expected stored size of the job",
            result.estimate.expected_stored_bytes,
            settings.max_stored_bytes,
            f"{_SIZE_HINT}, or select fewer rows with source.limit",
            unit="bytes",
            note=how,
        ),
        enforce,
    )


def require_estimate(spec: JobSpec, admission: Admission) -> JobEstimate:
    if admission.estimate is None:
        raise ApiProblem(
            422,
            ESTIMATE_UNAVAILABLE,
            f"cannot estimate model {spec.model.id!r}: its config is not readable on this server (for a "
            "hub model: not in this server's Hugging Face cache), so the array shapes are unknown; "
            "put the model in the cache, or submit the job (the worker checks the model)",
            title="Estimate unavailable",
        )
    return admission.estimate


def admit(
    spec: JobSpec, settings: ApiSettings, *, store: ObjectStore | None = None, owner: str | None = None
) -> Admission:
    """Submission: every check enforced (403 model not allowed, 422 limits and invalid specs, 422
    ``placement-unavailable`` when live workers report and none can place the model: api/placement.py)."""
    admission = assess(spec, settings, enforce=True, store=store, owner=owner)
    check_placement(spec, settings)
    return admission
