"""A bulk job: a source's sequences streamed through the model in micro-batches grouped by length.

Rows are read from the job's ``source`` (:mod:`storage.sources`), tokenized, and planned into
micro-batches in windows (:mod:`storage.jobs.microbatch`: at most ``token_budget`` padded tokens
and 5% padding each). Each micro-batch is exported by the one-batch :class:`~worker.export.Exporter`
into its own group of the bundle, ``batches/<k>`` (a complete format-1.x bundle of its sequences,
with their job-wide indices and source rows): a reader sees every finished micro-batch while the
job runs. The root (format 2.0) holds the sequence table (group ``sequences``) once the job ends.

Writes overlap the next forward passes: once micro-batch ``k``'s forward passes were queued (row
blocks queued in its writer's pipeline) and its token arrays computed
(:meth:`worker.export.Exporter.run_until_finish`), its drain — waiting for the device's figures
(the summary, the kv compression, the certificate), then for its chunks, the small arrays, summary
and kv groups, the metadata that marks it complete and its consolidation
(:meth:`~worker.export.Exporter.write_finish`) — runs on a thread of its own (:class:`_Drain`) while
micro-batch ``k + 1``'s forward passes are queued: the forward thread does not wait for micro-batch
``k``'s device work before it queues ``k + 1``'s (its input ids go to the device as queued copies).
At most one micro-batch drains at a time: the forward thread waits for drain ``k`` before it hands
over ``k + 1`` (back-pressure; memory is bounded by two writers' pending bytes). A micro-batch
counts as finished — its table entry, the progress (``unit_done``, ``on_tokens``) — only once its
drain wrote everything, on the drain thread. A drain's error is raised on the forward thread at its
next row block (or wait), and fails the job.

A resumed attempt plans the same micro-batches (the plan depends only on the rows and the spec)
and skips those whose group is complete; a cancel stops within one micro-batch and keeps the
finished ones (the one draining is finished first).
"""

from __future__ import annotations

import functools
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.common import ZARR_JSON

from storage.bundle.chunkstore import ChunkStore
from storage.bundle.format import BULK_BATCHES, BULK_FORMAT_VERSION, BULK_SEQUENCES
from storage.bundle.pipeline import PipelineStats
from storage.bundle.writer import BundleWriter
from storage.errors import InvalidJobSpec, JobCancelled
from storage.jobs.microbatch import DEFAULT_WINDOW, MicroBatch, PaddingTally, cut_window
from storage.jobs.spec import JobSpec
from storage.sources.rows import SourceContext, SourceRow, SourceRowError, iter_rows
from storage.sources.spec import PromptsSource, TokenIdsSource
from storage.stores.objectstore import zarr_store
from worker.capture.hostcopy import host_waits, pinned_wait_s
from worker.export import BatchInput, Exporter, ExportHooks
from worker.generation import tokenize_texts
from worker.models import LoadedModel

__all__ = ["BulkExporter", "batch_group"]


def batch_group(index: int) -> str:
    """The group of micro-batch ``index`` inside a bulk bundle."""
    return f"{BULK_BATCHES}/{index:06d}"


@dataclass
class _Sequence:
    """One tokenized row of the source."""

    row: SourceRow
    ids: list[int]


@dataclass
class _Table:
    """The sequence table, filled as micro-batches finish (one entry per exported sequence)."""

    columns: dict[str, list[Any]] = field(
        default_factory=lambda: {
            k: [] for k in ("sequence", "source_row", "batch", "slot", "length", "prompt_length", "text")
        }
    )

    def add(self, batch: int, slot: int, seq: _Sequence, length: int, prompt_length: int) -> None:
        values = (seq.row.index, seq.row.row, batch, slot, length, prompt_length, seq.row.text or "")
        for name, value in zip(self.columns, values, strict=True):
            self.columns[name].append(value)

    def arrays(self) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
        order = np.argsort(np.asarray(self.columns["sequence"], dtype=np.int64), kind="stable")
        out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
        for name, values in self.columns.items():
            dtype: Any = (
                object if name == "text" else (np.int64 if name in ("sequence", "source_row") else np.int32)
            )
            out[name] = (("sequence",), np.asarray(values, dtype=dtype)[order])
        return out


@dataclass(frozen=True)
class JobLimits:
    """The size a bulk job may reach (``QKVAULT_MAX_SEQUENCES``, ``QKVAULT_MAX_JOB_TOKENS``):
    admission checked an estimate from a sample; the worker checks every row it reads."""

    max_sequences: int
    max_job_tokens: int


class JobLimitExceeded(InvalidJobSpec):
    """The source holds more than the job may export (the message names the limit and the row)."""

    problem_type = "limit-exceeded"


class _Drain:
    """The writes of one finished micro-batch at a time, on a thread of its own (module docstring).

    :meth:`submit` waits for the drain in flight (back-pressure: at most one drains while the next
    micro-batch runs) and raises its error; :meth:`check` raises the error of one that already
    failed without waiting (the forward thread, between row blocks). ``waiting`` is set while the
    forward thread waits for a drain; ``waits`` and ``wait_s`` count those waits."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qkvault-drain")
        self._running: Future[None] | None = None
        self.waiting = threading.Event()
        self.waits = 0
        self.wait_s = 0.0

    def submit(self, work: Callable[[], None]) -> None:
        self.wait()
        self._running = self._pool.submit(work)

    def wait(self) -> None:
        """Until the drain in flight ended; raises its error."""
        running = self._running
        if running is None:
            return
        if not running.done():
            self.waits += 1
            t0 = time.perf_counter()
            self.waiting.set()
            try:
                wait_futures([running])
            finally:
                self.waiting.clear()
                self.wait_s += time.perf_counter() - t0
        self._running = None
        running.result()

    def check(self) -> None:
        running = self._running
        if running is not None and running.done() and running.exception() is not None:
            self.wait()

    def settle(self) -> BaseException | None:
        """Wait for the drain in flight (any error returned, not raised) and stop the thread."""
        try:
            self.wait()
        except BaseException as exc:
            return exc
        finally:
            self._pool.shutdown(wait=True)
        return None


class _MicroBatchHooks:
    """The outer job's hooks as one micro-batch's Exporter sees them: its phases and layer units are
    the micro-batch's own (the job counts sequences); cancel and lease checks go through, and so
    does the failure of the previous micro-batch's drain."""

    def __init__(self, outer: ExportHooks, drain: _Drain | None = None) -> None:
        self.outer = outer
        self.drain = drain

    def phase(self, name: str, units_total: int | None = None) -> None: ...
    def unit_done(self) -> None: ...

    def check_cancelled(self) -> None:
        if self.drain is not None:
            self.drain.check()
        self.outer.check_cancelled()


@dataclass
class _Read:
    """Sequences and tokens (prompt + new) read so far, checked against the job's limits."""

    sequences: int = 0
    tokens: int = 0

    def add(self, row: SourceRow, tokens: int, limits: JobLimits | None) -> None:
        self.sequences += 1
        self.tokens += tokens
        if limits is None:
            return
        where = {"field": "source", "row": row.row}
        fix = "select fewer rows with source.limit (and source.offset), or split the source over jobs"
        kept = "the finished micro-batches are kept"
        if self.sequences > limits.max_sequences:
            raise JobLimitExceeded(
                f"source row {row.row} is sequence {self.sequences:,}: more than this server's limit of "
                f"{limits.max_sequences:,} sequences a job (QKVAULT_MAX_SEQUENCES; the estimate at "
                f"submission, from a sample of the source, was below it); {fix}; {kept}",
                detail=where,
            )
        if self.tokens > limits.max_job_tokens:
            raise JobLimitExceeded(
                f"source row {row.row} brings the job to {self.tokens:,} tokens (prompt + max_new_tokens): "
                f"more than this server's limit of {limits.max_job_tokens:,} (QKVAULT_MAX_JOB_TOKENS; the "
                f"estimate at submission, from a sample of the source, was below it); {fix}; {kept}",
                detail=where,
            )


class BulkExporter:
    """Runs a bulk job (module docstring). ``writer_options``: keyword arguments of every
    :class:`BundleWriter` (store options, chunk callback, resume set, retry, threads, checksum)."""

    def __init__(
        self,
        spec: JobSpec,
        lm: LoadedModel,
        hooks: ExportHooks,
        *,
        bundle_url: str,
        writer_options: dict[str, Any] | None = None,
        context: SourceContext | None = None,
        limits: JobLimits | None = None,
        on_tokens: Callable[[int], None] | None = None,
        records_written: Callable[[], None] | None = None,
        overlap_drains: bool = True,
    ) -> None:
        """``limits``: checked on every row read (None: unlimited, as in the benchmark);
        ``on_tokens(n)``: the real tokens (prompt + new) of each finished micro-batch (progress);
        ``records_written()``: returns once the chunk records ``writer_options["on_chunk"]`` got so
        far are in the index (:meth:`worker.reporting.JobReporter.records_written`), called by each
        micro-batch's drain before it marks the micro-batch complete: an attempt skips a micro-batch
        it finds complete, so a kill must not leave one complete with chunks unrecorded;
        ``overlap_drains=False``: each micro-batch's drain ends before the next one starts (what
        the overlap is worth: ``python -m bench.bulk --serial-drains``).
        ``on_tokens`` and ``hooks.unit_done`` are called on the drain thread, once the micro-batch is
        written (:meth:`run`; the JobReporter's calls take its lock), the other hooks on the
        forward thread."""
        assert spec.source is not None, "a bulk job has a source"
        self.spec, self.lm, self.hooks = spec, lm, hooks
        self.source = spec.source
        self.bundle_url = bundle_url.rstrip("/")
        self.writer_options = dict(writer_options or {})
        self.context = context or SourceContext()
        self.table = _Table()
        self.padding = PaddingTally()
        self.resumed_batches = 0
        self.limits = limits
        self.on_tokens = on_tokens
        self.records_written = records_written
        # seconds summed over the micro-batches exported here (each group's attrs keep its own);
        # "drain": writing them on the drain thread, "drain_wait": the forward thread waiting for it
        self.batch_timings: dict[str, float] = {}
        self.writer_stats = PipelineStats()  # the micro-batches' chunk writers, summed
        self.copy_waits = 0  # device-to-host copies the forward thread waited for (timings: copy_wait)
        self.overlap_drains = overlap_drains
        self.finished_batches = 0  # written and complete (counted on the drain thread)
        self.drain: _Drain | None = None

    def _writer(self, group: str | None = None) -> BundleWriter:
        url = self.bundle_url if group is None else f"{self.bundle_url}/{group}"
        return BundleWriter(url, key_prefix="" if group is None else f"{group}/", **self.writer_options)

    def _sequences(self) -> Iterator[_Sequence]:
        """The source's rows, tokenized and checked against the model's positions."""
        new = self.spec.generation.max_new_tokens
        limit = self.lm.facts.max_positions
        rows = iter_rows(self.source, self.context)
        read = _Read()
        while window := list(itertools.islice(rows, 256)):
            texts = [r.text for r in window if r.text is not None]
            tokenized = iter(tokenize_texts(self.spec, self.lm.tokenizer, texts))
            for row in window:
                ids = list(row.token_ids) if row.token_ids is not None else next(tokenized)
                where = {"field": "source", "row": row.row}
                if not ids:
                    raise SourceRowError(f"source row {row.row} tokenizes to no tokens", detail=where)
                if limit is not None and len(ids) + new > limit:
                    raise SourceRowError(
                        f"source row {row.row} is too long for the model: {len(ids)} tokens + "
                        f"max_new_tokens {new} > {limit} positions; drop or shorten it (source.offset/limit)",
                        detail=where,
                    )
                read.add(row, len(ids) + new, self.limits)
                yield _Sequence(row, ids)

    def _plan(self) -> Iterator[tuple[MicroBatch, list[_Sequence]]]:
        new = self.spec.generation.max_new_tokens
        index = 0
        sequences = self._sequences()
        while window := list(itertools.islice(sequences, DEFAULT_WINDOW)):
            lengths = [(i, len(s.ids) + new) for i, s in enumerate(window)]
            for batch in cut_window(lengths, self.source.token_budget, self.source.max_sequences, index):
                index += 1
                yield batch, [window[i] for i in batch.sequences]

    def _read_store(self) -> Any:
        options = self.writer_options.get("storage_options")
        return zarr_store(self.bundle_url, storage_options=options, read_only=True)

    @functools.cached_property
    def _documents(self) -> ChunkStore:
        """The bundle's objects, read directly (a local file read, or one GET: not through zarr's
        event loop, which the drain thread's metadata writes keep busy)."""
        options = self.writer_options
        return ChunkStore(
            self.bundle_url, storage_options=options.get("storage_options"), retry=options.get("retry")
        )

    def _complete(self, group: str) -> bool:
        """Whether an earlier attempt finished micro-batch ``group`` (its metadata says complete)."""
        stored = self._documents.read(f"{group}/{ZARR_JSON}")
        try:
            document = json.loads(stored) if stored is not None else {}
        except ValueError:  # a document cut short: not finished
            return False
        attributes = document.get("attributes") if document.get("node_type") == "group" else None
        return bool((attributes or {}).get("complete"))

    def run(self, job_id: str) -> dict[str, Any]:
        started = time.perf_counter()
        root = self._writer()
        root.create_root(
            self._root_attrs(job_id), format_version=BULK_FORMAT_VERSION, children=[BULK_BATCHES]
        )
        source, total = self.source, 0  # rows of a file or dataset are counted as they stream
        if isinstance(source, PromptsSource):
            total = len(source.prompts)
        elif isinstance(source, TokenIdsSource):
            total = len(source.token_ids)
        if self.source.limit is not None:
            total = min(total, self.source.limit) if total else self.source.limit
        self.hooks.phase("micro-batches", units_total=total or None)
        try:
            self._run_batches(job_id, self._plan())
        except (JobCancelled, JobLimitExceeded):  # keep the finished micro-batches, readable
            self._finish(root, started, self.finished_batches, partial=True)
            raise
        return self._finish(root, started, self.finished_batches, partial=False)

    def _run_batches(self, job_id: str, planned: Iterable[tuple[MicroBatch, list[_Sequence]]]) -> None:
        """Every planned micro-batch, each one's drain overlapping the next one's forward passes
        (module docstring); every drain has ended when this returns or raises. A drain's error wins
        over what stopped the forward thread meanwhile (a cancel, a limit, the same store error)."""
        drain = self.drain = _Drain()
        pinned_before = pinned_wait_s(self.lm.device)
        waits = host_waits(self.lm.device)
        waited_before = (waits.copies, waits.seconds)
        try:
            for batch, members in planned:
                drain.submit(self._start_batch(job_id, batch, members, drain))
                if not self.overlap_drains:
                    drain.wait()
            drain.wait()
        except BaseException as stopped:
            failed = drain.settle()
            if failed is not None and failed is not stopped and isinstance(stopped, Exception):
                raise failed from stopped  # the job fails with the drain's error
            raise
        finally:
            drain.settle()
            self.batch_timings["drain_wait"] = self.batch_timings.get("drain_wait", 0.0) + drain.wait_s
            # the forward thread's device-to-host copies waiting for room in the pinned ring
            self.batch_timings["pinned_wait"] = pinned_wait_s(self.lm.device) - pinned_before
            # and for a device-to-host copy itself (a small block's synchronous copy, a partial block)
            self.batch_timings["copy_wait"] = waits.seconds - waited_before[1]
            self.copy_waits = waits.copies - waited_before[0]

    def _start_batch(
        self, job_id: str, batch: MicroBatch, members: list[_Sequence], drain: _Drain | None = None
    ) -> Callable[[], None]:
        """Micro-batch ``batch``'s forward passes (its row blocks queued), or nothing when an
        earlier attempt finished it; returns the rest (its writes, then counting it finished), for
        the drain thread. ``drain``: the previous micro-batch's, whose failure stops this one."""
        t0 = time.perf_counter()
        group = batch_group(batch.index)
        self.padding.add(batch)
        if self._complete(group):  # an earlier attempt finished it
            self.resumed_batches += 1
            stored = zarr.open_group(self._read_store(), path=group, mode="r", zarr_format=3)
            lengths = [int(n) for n in np.asarray(stored["length"])]
            prompts = [int(n) for n in np.asarray(stored["prompt_length"])]
            return lambda: self._batch_done(batch, members, lengths, prompts)
        inputs = BatchInput(
            prompt_ids=[m.ids for m in members],
            texts=[m.row.text or "" for m in members],
            sequences=[m.row.index for m in members],
            source_rows=[m.row.row for m in members],
            index=batch.index,
        )
        exporter = Exporter(
            self.spec, self.lm, self._writer(group), _MicroBatchHooks(self.hooks, drain), batch=inputs
        )
        exporter.timings["setup"] = time.perf_counter() - t0  # its writer, layout, certifier
        prepared = exporter.run_until_finish(f"{job_id}/{group}")

        def finish() -> None:
            t0 = time.perf_counter()
            summary = exporter.write_finish(prepared(), before_complete=self.records_written)
            timings = dict(summary["timings_s"])
            timings["total"] -= timings.pop("load_model", 0.0)  # the model loads once per process
            timings["drain"] = time.perf_counter() - t0
            for phase, seconds in timings.items():
                self.batch_timings[phase] = self.batch_timings.get(phase, 0.0) + seconds
            self.writer_stats.add(exporter.writer.pipeline_stats)
            self._batch_done(batch, members, summary["lengths"], summary["prompt_lengths"])

        return finish

    def _batch_done(
        self, batch: MicroBatch, members: list[_Sequence], lengths: list[int], prompts: list[int]
    ) -> None:
        """Micro-batch ``batch`` is stored and complete: its table entries and progress."""
        for slot, member in enumerate(members):
            self.table.add(batch.index, slot, member, lengths[slot], prompts[slot])
            self.hooks.unit_done()
        self.finished_batches += 1
        if self.on_tokens is not None:
            self.on_tokens(sum(lengths))

    def _root_attrs(self, job_id: str) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "kind": "bulk",
            "model": self.spec.model.id,
            "source": self.spec.bundle_dump()["source"],
        }

    def _finish(self, root: BundleWriter, started: float, batches: int, *, partial: bool) -> dict[str, Any]:
        self.hooks.phase("finalizing")
        root.write_group(BULK_SEQUENCES, self.table.arrays())
        bulk = {
            "sequences": len(self.table.columns["sequence"]),
            "micro_batches": batches,
            "tokens": self.padding.tokens,
            "padded_tokens": self.padding.padded_tokens,
            "padding_fraction": round(self.padding.fraction, 4),
        }
        timings = {"total": round(time.perf_counter() - started, 3)}
        timings.update({f"micro_batches_{k}": round(v, 3) for k, v in self.batch_timings.items()})
        root.finalize(
            {"bulk": bulk, "timings_s": timings}, complete=not partial, partial=partial, consolidate=False
        )
        # where the chunk writers' time went (thread-seconds per pool, bytes in and out)
        writer = self.writer_stats.to_dict()
        return {
            **bulk,
            "resumed_micro_batches": self.resumed_batches,
            "timings_s": timings,
            "writer": writer,
            "copy_waits": self.copy_waits,
        }
