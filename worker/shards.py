"""Scale-out: one bulk job's micro-batches run by every worker that listens (issue 15).

1. **Plan** (the job's export task, :func:`start_sharded`): the source is read and tokenized once
   (lengths only) and planned into micro-batches exactly as one worker plans them (windows of
   ``DEFAULT_WINDOW`` rows, :func:`storage.jobs.microbatch.cut_window`, micro-batches numbered
   across windows). A job of more than ``QKVAULT_SHARD_MICRO_BATCHES`` micro-batches is cut into
   shards of that many consecutive micro-batches, stored in ``job_shards`` with the window and the
   micro-batch number each starts at (storage/index/shards.py), and sent as a Celery chord: one
   ``qkvault.shard`` task per shard, ``qkvault.finalize`` as its body. Smaller jobs run on the one
   worker as before.
2. **Shards** (:func:`run_shard`): any worker claims a shard (its own lease, fencing and attempt
   cap), reads the source up to the shard's first window without tokenizing it, re-plans from
   there (same numbers) and exports its micro-batches into their groups ``batches/<k>`` of the one
   bundle, resuming by chunk on a later attempt. The source is read as one worker reads it, so a
   ``shuffle_seed`` gives the same rows in every shard (each shard replays the shuffle up to its
   rows).
3. **Finalize** (:func:`run_finalize`): once no shard is left to run, one worker writes the sequence
   table (read back from the micro-batch groups) and the root metadata. When every shard succeeded
   the bundle is the one a single worker writes, byte for byte (timings aside); when the job stopped
   (cancelled, or a shard failed for good) the table holds the finished micro-batches, as a single
   worker's cancelled job does, and the job ends ``cancelled`` or ``failed``, ``partial``.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import zarr

from storage.bundle.format import BULK_BATCHES, BULK_FORMAT_VERSION
from storage.bundle.records import ChunkRecord
from storage.bundle.resume import ResumeSet
from storage.errors import IndexUnavailable, JobCancelled, LeaseLost
from storage.index import Index, JobRecord, JobState
from storage.index import shards as sh
from storage.jobs.microbatch import DEFAULT_WINDOW, MicroBatch, cut_window
from storage.jobs.spec import JobSpec
from storage.sources.rows import SourceContext, SourceRow, iter_rows
from storage.stores.objectstore import ObjectStore
from worker.bulk import BulkExporter, JobLimits, _Sequence, batch_group
from worker.export import Exporter
from worker.generation import tokenize_texts
from worker.layershards import (
    finalize_layers,
    layer_cut_blockers,
    plan_layer_shards,
    run_layer_shard,
)
from worker.models import LoadedModel, ModelCache
from worker.reporting import JobReporter, ReportIntervals
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

__all__ = ["ShardExporter", "run_finalize", "run_shard", "start_sharded"]


@dataclass(frozen=True)
class _Planned:
    window: int
    window_first_batch: int
    batch: MicroBatch


class ShardExporter(BulkExporter):
    """A :class:`BulkExporter` that plans the whole job (:meth:`plan`), exports one range of its
    micro-batches (:meth:`run_range`) or writes its root from the stored groups (:meth:`finalize`)."""

    def _windows(self, first_window: int = 0, *, check: bool = True) -> Iterator[tuple[int, list[_Sequence]]]:
        """The job's windows of tokenized sequences from ``first_window`` on; earlier rows are read
        (a seeded shuffle depends on them) but not tokenized. ``check``: count rows against the
        job's limits (the planner does; a shard's rows were counted then)."""
        if check or first_window == 0:
            sequences = self._sequences()
            skipped = itertools.islice(sequences, first_window * DEFAULT_WINDOW)
            for _ in skipped:
                pass
        else:
            rows = iter_rows(self.source, self.context)
            for _ in itertools.islice(rows, first_window * DEFAULT_WINDOW):
                pass
            sequences = self._tokenized(rows)
        window = first_window
        while chunk := list(itertools.islice(sequences, DEFAULT_WINDOW)):
            yield window, chunk
            window += 1

    def _tokenized(self, rows: Iterator[SourceRow]) -> Iterator[_Sequence]:
        while block := list(itertools.islice(rows, 256)):
            texts = [r.text for r in block if r.text is not None]
            tokenized = iter(tokenize_texts(self.spec, self.lm.tokenizer, texts))
            for row in block:
                ids = list(row.token_ids) if row.token_ids is not None else next(tokenized)
                yield _Sequence(row, ids)

    def _batches(
        self, first_window: int = 0, window_first_batch: int = 0, *, check: bool = True
    ) -> Iterator[tuple[_Planned, list[_Sequence]]]:
        new = self.spec.generation.max_new_tokens
        index = window_first_batch
        for window, members in self._windows(first_window, check=check):
            starts = index
            lengths = [(i, len(s.ids) + new) for i, s in enumerate(members)]
            for batch in cut_window(lengths, self.source.token_budget, self.source.max_sequences, index):
                index += 1
                yield _Planned(window, starts, batch), [members[i] for i in batch.sequences]

    def plan(self, batches_per_shard: int) -> list[sh.ShardPlan]:
        """Every micro-batch of the job, cut into shards of ``batches_per_shard``."""
        plans: list[sh.ShardPlan] = []
        current: list[_Planned] = []

        def close() -> None:
            first = current[0]
            plans.append(
                sh.ShardPlan(
                    first_window=first.window,
                    window_first_batch=first.window_first_batch,
                    first_batch=first.batch.index,
                    batches=len(current),
                    units_total=sum(len(p.batch.sequences) for p in current),
                    tokens_planned=sum(p.batch.tokens for p in current),
                    padded_tokens=sum(p.batch.padded_tokens for p in current),
                )
            )
            current.clear()

        for planned, _ in self._batches():
            current.append(planned)
            if len(current) == batches_per_shard:
                close()
        if current:
            close()
        return plans

    def run_range(self, job_id: str, shard: sh.ShardRecord) -> dict[str, Any]:
        """Export micro-batches ``shard.first_batch ..`` (``shard.batches`` of them)."""
        started = time.perf_counter()
        self.hooks.phase("micro-batches", units_total=shard.units_total)
        end = shard.first_batch + shard.batches

        def in_range() -> Iterator[tuple[MicroBatch, list[_Sequence]]]:
            batches = self._batches(shard.first_window, shard.window_first_batch, check=False)
            for planned, members in batches:
                if planned.batch.index >= end:
                    return
                if planned.batch.index >= shard.first_batch:
                    yield planned.batch, members

        self._run_batches(job_id, in_range())  # each drain overlaps the next micro-batch, as one worker's
        return {
            "resumed_micro_batches": self.resumed_batches,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def create_root(self, job_id: str) -> None:
        self._writer().create_root(
            self._root_attrs(job_id), format_version=BULK_FORMAT_VERSION, children=[BULK_BATCHES]
        )

    def finalize(
        self, job_id: str, shards: Sequence[sh.ShardRecord], *, partial: bool = False
    ) -> dict[str, Any]:
        """The sequence table from the stored micro-batch groups, then the root (as one worker
        writes it at the end of the job). ``partial`` (the job stopped): of the finished groups only,
        as one worker keeps what it finished when it is cancelled."""
        started = time.perf_counter()
        root = self._writer()
        root.create_root(
            self._root_attrs(job_id), format_version=BULK_FORMAT_VERSION, children=[BULK_BATCHES]
        )
        store = self._read_store()
        new = self.spec.generation.max_new_tokens
        finished = 0
        for k in range(sum(s.batches for s in shards)):
            if partial and not self._complete(batch_group(k)):
                continue
            group = zarr.open_group(store, path=batch_group(k), mode="r", zarr_format=3)
            columns = {
                n: [int(v) for v in np.asarray(group[n])]
                for n in ("sequence", "source_row", "length", "prompt_length")
            }
            texts: list[str] = cast(dict[str, Any], group.attrs["texts"])["prompts"]
            for slot, sequence in enumerate(columns["sequence"]):
                row = SourceRow(index=sequence, row=columns["source_row"][slot], text=texts[slot] or None)
                self.table.add(
                    k, slot, _Sequence(row, []), columns["length"][slot], columns["prompt_length"][slot]
                )
            planned = tuple(n + new for n in columns["prompt_length"])  # as the plan counted them
            self.padding.add(MicroBatch(k, tuple(range(len(planned))), planned))
            finished += 1
        return self._finish(root, started, finished, partial=partial)


class ShardSink:
    """The index as a shard's :class:`JobReporter` sees it: the same four calls, each on the shard
    (its lease, its progress; chunk records under the job); a shard stops as a job is cancelled
    when its job is stopping (cancelled, or another shard failed for good)."""

    def __init__(self, index: Index, shard: int) -> None:
        self.index, self.shard = index, shard

    def is_cancel_requested(self, job_id: str) -> bool:
        return sh.is_stopping(self.index, job_id)

    def heartbeat(self, job_id: str, worker_id: str) -> bool:
        return sh.shard_heartbeat(self.index, job_id, self.shard, worker_id)

    def record_chunks(self, job_id: str, chunks: Sequence[ChunkRecord], *, worker: str) -> None:
        sh.record_shard_chunks(self.index, job_id, self.shard, chunks, worker=worker)

    def update_progress(
        self, job_id: str, *, units_done: int, tokens_done: int | None, worker: str, **_: Any
    ) -> bool:
        return sh.shard_progress(
            self.index, job_id, self.shard, units_done=units_done, tokens_done=tokens_done or 0, worker=worker
        )


def _intervals(settings: WorkerSettings) -> ReportIntervals:
    return ReportIntervals(
        heartbeat_interval_s=settings.heartbeat_interval_s,
        progress_interval_s=settings.progress_interval_s,
        record_interval_s=settings.record_interval_s,
    )


def _shards_to_send(
    index: Index, job: JobRecord, plan: Callable[[], list[sh.ShardPlan]], worker_id: str
) -> list[int] | None:
    """The job's shards not yet ended, planned by ``plan()`` the first time (None: one shard's
    worth or less, run the job here as before); the job's lease passes to its shards."""
    existing = sh.list_shards(index, job.id)
    if not existing:
        plans = plan()
        if len(plans) <= 1:
            return None
        existing = sh.create_shards(index, job.id, plans, worker=worker_id, max_attempts=job.max_attempts)
        log.info(
            "job %s: %d shards (%d units of work)", job.id, len(plans), sum(p.units_total for p in plans)
        )
    else:
        existing = sh.create_shards(index, job.id, [], worker=worker_id, max_attempts=job.max_attempts)
    return [s.shard for s in existing if s.state not in sh.ENDED]


def start_sharded(
    job: JobRecord,
    spec: JobSpec,
    loaded: LoadedModel,
    reporter: JobReporter,
    *,
    index: Index,
    settings: WorkerSettings,
    context: SourceContext,
    writer_options: dict[str, Any],
    worker_id: str,
) -> list[int] | None:
    """Plan a bulk job the worker holds into shards of micro-batches (see the module docstring).
    None: one shard's worth or less, run it here as before. Else the shards to send (none left to
    run: send only the finalize); the job's lease has passed to its shards."""

    def plan() -> list[sh.ShardPlan]:
        reporter.phase("planning")
        exporter = ShardExporter(
            spec, loaded, reporter, bundle_url=job.store_url, writer_options=writer_options, context=context,
            limits=JobLimits(settings.max_sequences, settings.max_job_tokens),
        )  # fmt: skip
        plans = exporter.plan(settings.shard_micro_batches)
        if len(plans) > 1:
            exporter.create_root(job.id)  # readers see the bundle while its shards run
            reporter.flush()
        return plans

    return _shards_to_send(index, job, plan, worker_id)


def start_layer_sharded(
    job: JobRecord,
    exporter: Exporter,
    reporter: JobReporter,
    *,
    index: Index,
    settings: WorkerSettings,
    worker_id: str,
) -> list[int] | None:
    """Plan a one-batch job into shards of ``QKVAULT_SHARD_LAYERS`` exported layers
    (worker/layershards.py); None: it is not cut (too few layers, or a capture option that needs
    every layer: logged), run it here as before."""

    def plan() -> list[sh.ShardPlan]:
        blockers = layer_cut_blockers(exporter.spec)
        if blockers:
            log.info("job %s: not cut by layers (%s); one worker runs it", job.id, "; ".join(blockers))
            return []
        layers = len(exporter.layout.layers)
        plans = plan_layer_shards(layers, settings.shard_layers, exporter.passes)
        if len(plans) > 1:
            exporter.writer.create(exporter.layout, exporter.base_attrs(job.id))  # readers see it
            exporter.writer.wait()
            reporter.flush()
        return plans

    return _shards_to_send(index, job, plan, worker_id)


def run_shard(
    job_id: str,
    number: int,
    *,
    index: Index,
    store: ObjectStore,
    models: ModelCache,
    settings: WorkerSettings,
    worker_id: str,
) -> str | None:
    """Run one shard: ``"finalize"`` when no shard of the job is left to run (send the finalize task),
    ``"retry"`` when given back (send it again after ``retry_delay_s``), the shard's end state, or
    None (nothing to run, or the lease was lost)."""
    from worker.jobs import GIVEN_BACK, _failure

    try:
        shard = sh.claim_shard(index, job_id, number, worker_id, lease_timeout_s=settings.lease_timeout_s)
    except IndexUnavailable as exc:
        log.warning("job %s shard %d: not claimed, %s", job_id, number, exc)
        return "retry"
    if shard is None:
        log.info("job %s shard %d: nothing to run (ended, cancelled, or running elsewhere)", job_id, number)
        return "finalize" if sh.finalize_due(index, job_id) else None
    job = index.get_job(job_id)
    sink = cast(Index, ShardSink(index, number))  # JobReporter's four calls, on the shard
    with JobReporter(sink, job_id, worker_id, _intervals(settings)) as reporter:
        try:
            spec = JobSpec.model_validate(job.spec)
            loaded = models.get(spec.model)
            resume = ResumeSet.from_records(index.list_chunks(job_id)) if shard.attempts > 1 else None
            options = settings.writer_options(
                storage_options=store.storage_options, on_chunk=reporter.chunk_stored, resume=resume
            )
            if spec.bulk:
                exporter = ShardExporter(
                    spec, loaded, reporter, bundle_url=job.store_url, writer_options=options,
                    context=SourceContext(store=store, datasets_dir=settings.datasets_dir, owner=job.owner),
                    on_tokens=reporter.tokens, records_written=reporter.records_written,
                )  # fmt: skip
                summary = exporter.run_range(job_id, shard)
            else:
                summary = run_layer_shard(
                    job_id, spec, loaded, shard, reporter,
                    bundle_url=job.store_url, store=store, writer_options=options,
                )  # fmt: skip
        except JobCancelled:  # the job is stopping: cancelled, or another shard failed
            reporter.flush()
            last = sh.finish_shard(index, job_id, number, sh.CANCELLED, worker=worker_id)
            return "finalize" if last else sh.CANCELLED
        except LeaseLost as exc:
            log.warning("job %s shard %d: stopped, lease lost: %s", job_id, number, exc)
            return None
        except Exception as exc:
            try:
                reporter.flush()
            except Exception:
                log.warning("job %s shard %d: chunk records not written", job_id, number, exc_info=True)
            problem = {
                **_failure(exc),
                "shard": number,
                "attempts": shard.attempts,
                "max_attempts": shard.max_attempts,
            }
            if isinstance(exc, (*GIVEN_BACK, IndexUnavailable)) and shard.attempts < shard.max_attempts:
                sh.release_shard(index, job_id, number, worker=worker_id, error={**problem, "retrying": True})
                return "retry"
            log.exception("job %s shard %d failed", job_id, number)
            last = sh.finish_shard(index, job_id, number, sh.FAILED, worker=worker_id, error=problem)
            return "finalize" if last else sh.FAILED
        reporter.flush()
    log.info("job %s shard %d done: %s", job_id, number, summary)
    last = sh.finish_shard(index, job_id, number, sh.SUCCEEDED, worker=worker_id)
    return "finalize" if last else sh.SUCCEEDED


def run_finalize(
    job_id: str,
    *,
    index: Index,
    store: ObjectStore,
    settings: WorkerSettings,
    worker_id: str,
    models: ModelCache | None = None,
) -> JobState | None:
    """Write a sharded job's sequence table and root once no shard is left to run (the job's lease
    is this worker's meanwhile), and end the job: ``succeeded`` when every shard did, else
    ``failed`` with the failed shard's problem or ``cancelled``, keeping the finished micro-batches
    (``partial``). None when it is not (yet) due or another worker finalizes it. ``models``: a job
    cut by layers finishes through its model's Exporter (the model of the worker's cache)."""
    from worker.jobs import _failure

    job = sh.claim_finalize(index, job_id, worker_id, lease_timeout_s=settings.lease_timeout_s)
    if job is None:
        return None
    shards = sh.list_shards(index, job_id)
    failed = next((s for s in shards if s.state == sh.FAILED), None)
    complete = failed is None and not job.cancel_requested and all(s.state == sh.SUCCEEDED for s in shards)
    with JobReporter(index, job_id, worker_id, _intervals(settings)) as reporter:
        try:
            reporter.phase("finalizing")
            spec = JobSpec.model_validate(job.spec)
            resume = ResumeSet.from_records(index.list_chunks(job_id))
            options = settings.writer_options(
                storage_options=store.storage_options, on_chunk=reporter.chunk_stored, resume=resume
            )
            if spec.bulk:
                exporter = ShardExporter(
                    spec, cast(LoadedModel, None), reporter, bundle_url=job.store_url, writer_options=options
                )  # (no model: the groups are stored, only their tables are read)
                summary = exporter.finalize(job_id, shards, partial=not complete)
            else:
                if models is None:
                    raise ValueError("a job cut by layers is finalized with its model: pass models")
                summary = finalize_layers(
                    job_id, spec, models.get(spec.model), shards, reporter,
                    bundle_url=job.store_url, store=store, writer_options=options, partial=not complete,
                )  # fmt: skip
        except LeaseLost:
            return None
        except Exception as exc:
            log.exception("job %s: finalize failed", job_id)
            reporter.flush()
            problem = failed.error if failed is not None and failed.error else _failure(exc)
            index.finish(job_id, JobState.FAILED, error=problem, partial=True, worker=worker_id)
            return JobState.FAILED
        reporter.flush()
    if complete:
        done = sum(s.units_total for s in shards)
        tokens = sum(s.tokens_done for s in shards) or None
        index.update_progress(
            job_id, units_done=done, units_total=done, phase="done", worker=worker_id,
            tokens_done=tokens, tokens_total=tokens,
        )  # fmt: skip
    result = {**summary, "shards": sh.shard_summary(shards, sh.unit_of(job.spec))}
    result.pop("resumed_micro_batches", None)
    if complete:
        index.finish(job_id, JobState.SUCCEEDED, result=result, worker=worker_id)
        return JobState.SUCCEEDED
    if failed is not None:
        problem = failed.error or job.error or sh.exhausted_problem(job_id, failed, sh.unit_of(job.spec))
        index.finish(job_id, JobState.FAILED, error=problem, partial=True, result=result, worker=worker_id)
        return JobState.FAILED
    index.finish(job_id, JobState.CANCELLED, partial=True, result=result, worker=worker_id)
    return JobState.CANCELLED
