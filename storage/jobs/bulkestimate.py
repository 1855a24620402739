"""A bulk job's estimate from a sample of its source: the sampled rows are planned into
micro-batches as the worker plans them (:mod:`storage.jobs.microbatch`), each micro-batch is
estimated as the bundle group it becomes (:func:`storage.jobs.estimate.estimate`), and the sum is
scaled from the sampled rows to the job's sequences (docs/bulk-jobs.md, "Limits").
"""

from __future__ import annotations

from dataclasses import replace

from storage.jobs.estimate import (
    ArrayEstimate,
    BulkFigures,
    JobEstimate,
    TokenEstimate,
    count_tokens,
    estimate,
)
from storage.jobs.microbatch import PaddingTally, plan_microbatches
from storage.jobs.spec import JobSpec
from storage.models.facts import ModelFacts
from storage.sources.sample import SourceSample

__all__ = ["SEQUENCE_TABLE_BYTES", "estimate_bulk", "job_tokens", "sample_lengths"]

SEQUENCE_TABLE_BYTES = 40  # the root's sequence table per sequence: six integers, compressed (+ text)


def sample_lengths(spec: JobSpec, sample: SourceSample, tokenizer_json: str | None) -> tuple[list[int], bool]:
    """Prompt tokens of each sampled row (token-id rows exactly; texts as :func:`count_tokens`
    counts them) and whether every count is exact."""
    texts = [text for text, ids in sample.rows if ids is None and text is not None]
    counted, exact = count_tokens(spec, texts, tokenizer_json)
    counts = iter(counted)
    lengths = [len(ids) if ids is not None else next(counts) for _, ids in sample.rows]
    return lengths, exact


def job_tokens(sample: SourceSample, lengths: list[int], max_new_tokens: int) -> tuple[int, int]:
    """(prompt tokens, prompt + new tokens) of the whole job: the sampled rows' ``lengths`` scaled
    to its sequences (the sample's own rows when their count is unknown)."""
    sequences = sample.sequences if sample.sequences is not None else len(lengths)
    prompt = round(sum(lengths) * sequences / len(lengths))
    return prompt, prompt + max_new_tokens * sequences


def _scaled(array: ArrayEstimate, factor: float) -> ArrayEstimate:
    return replace(
        array,
        chunks_written=round(array.chunks_written * factor),
        raw_bytes=round(array.raw_bytes * factor),
        expected_stored_bytes=round(array.expected_stored_bytes * factor),
    )


def estimate_bulk(
    spec: JobSpec, facts: ModelFacts, sample: SourceSample, lengths: list[int], exact_tokens: bool
) -> JobEstimate:
    """The whole job's bundle, from ``sample`` (rows with ``lengths`` prompt tokens). Arrays are
    listed with the shape of the sample's largest micro-batch and the job's totals; with an
    unknown sequence count the figures are the sample's own (an assumption says so)."""
    assert spec.source is not None, "a bulk job has a source"
    if not lengths:
        raise ValueError("a bulk estimate needs at least one sampled row")
    new = spec.generation.max_new_tokens
    source = spec.source
    lengths_new = [n + new for n in lengths]
    plan = list(
        plan_microbatches(lengths_new, token_budget=source.token_budget, max_sequences=source.max_sequences)
    )
    text_bytes = [len((text or "").encode("utf-8")) for text, _ in sample.rows]
    parts: list[JobEstimate] = []
    tally = PaddingTally()
    for batch in plan:
        tally.add(batch)
        members = [lengths[i] for i in batch.sequences]
        prompt_bytes = sum(text_bytes[i] for i in batch.sequences)
        parts.append(estimate(spec, facts, members, exact_tokens, prompt_bytes=prompt_bytes))
    sequences = sample.sequences if sample.sequences is not None else len(lengths)
    factor = sequences / len(lengths)
    largest = max(parts, key=lambda e: e.raw_bytes)
    arrays = []
    for template in largest.arrays:
        same = [a for part in parts for a in part.arrays if a.name == template.name]
        total = replace(
            template,
            chunks_written=sum(a.chunks_written for a in same),
            raw_bytes=sum(a.raw_bytes for a in same),
            expected_stored_bytes=sum(a.expected_stored_bytes for a in same),
        )
        arrays.append(_scaled(total, factor))
    table = round((SEQUENCE_TABLE_BYTES * len(lengths) + sum(text_bytes)) * factor)
    metadata = round(sum(p.metadata_bytes for p in parts) * factor) + table
    prompt_total, total_tokens = job_tokens(sample, lengths, new)
    figures = BulkFigures(
        sequences=sample.sequences,
        sequences_exact=sample.exact,
        sampled_rows=len(lengths),
        sampled=sample.how,
        total_tokens=total_tokens,
        micro_batches=max(1, round(len(plan) * factor)),
        padding_fraction=round(tally.fraction, 4),
    )
    how = "counted" if sample.exact else "estimated"
    assumptions = [
        *largest.assumptions,
        f"a bulk job: {len(lengths):,} sampled rows ({sample.how}) planned into micro-batches of at most "
        f"{source.token_budget:,} padded tokens and scaled to the job's "
        + (f"{sequences:,} sequences ({how})" if sample.sequences is not None else "sequences"),
    ]
    if sample.sequences is None:
        assumptions.append(
            "the source's size is unknown here: every figure is for the sampled rows only; the worker "
            "checks the limits as it reads the rest"
        )
    return JobEstimate(
        arrays=arrays,
        raw_bytes=sum(a.raw_bytes for a in arrays),
        expected_stored_bytes=sum(a.expected_stored_bytes for a in arrays) + metadata,
        metadata_bytes=metadata,
        tokens=TokenEstimate(
            prompt=lengths,
            prompt_total=prompt_total,
            max_new_tokens=new,
            max_total=figures.total_tokens,
            positions=max(lengths) + new,
            exact=exact_tokens and sample.exact,
        ),
        attention_profile=largest.attention_profile,
        upper_bound=largest.upper_bound,
        approximate=not (exact_tokens and sample.exact),
        assumptions=assumptions,
        bulk=figures,
    )
