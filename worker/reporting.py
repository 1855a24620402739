"""The one thread that talks to the SQL index while a job's forward passes run.

The forward thread (model, capture, chunk hand-off) never waits on SQL: what it learns goes into
memory and :class:`JobReporter`'s thread writes it.

- **progress**: :meth:`JobReporter.phase` and :meth:`JobReporter.unit_done` keep the latest phase
  and unit counts; the thread writes them every ``progress_interval_s`` (a new phase at once);
- **chunk records**: :meth:`JobReporter.chunk_stored` (called by the bundle's store threads once a
  chunk is stored) queues each record; the thread writes them in batches every
  ``record_interval_s``. A failed batch stays queued and is written on the next tick;
- **lease and cancel**: the thread renews the lease every ``heartbeat_interval_s`` and reads the
  job's cancel request every ``progress_interval_s`` into flags; :meth:`JobReporter.check_cancelled`
  reads only those flags, so a cancel lands within one decoding step or row block.

:meth:`JobReporter.flush` writes whatever is queued from the calling thread (the job's thread,
before it records the job's outcome), so the index holds every stored chunk before the job ends.
:meth:`JobReporter.records_written` waits (on a bulk job's drain thread) until the reporter thread
wrote every record queued so far: a micro-batch is marked complete only then, because an attempt
that finds it complete skips it, and its chunks would otherwise stay unrecorded after a kill.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from storage.bundle.records import ChunkRecord
from storage.errors import JobCancelled, LeaseLost
from storage.index import Index

log = logging.getLogger(__name__)


RECORDS_RETRY_S = 1.0  # records_written asks the thread to write again this often while it waits


@dataclass(frozen=True)
class ReportIntervals:
    """How often the reporter thread writes, in seconds (worker settings of the same names)."""

    heartbeat_interval_s: float
    progress_interval_s: float
    record_interval_s: float

    @property
    def tick_s(self) -> float:
        return max(0.01, min(self.heartbeat_interval_s, self.progress_interval_s, self.record_interval_s))


class JobReporter:
    """Progress, chunk records, lease and cancel of one running attempt (module docstring); every
    write is fenced on ``worker_id``'s lease (LeaseLost once it moved or the job ended)."""

    def __init__(self, index: Index, job_id: str, worker_id: str, intervals: ReportIntervals) -> None:
        self.index, self.job_id, self.worker_id, self.intervals = index, job_id, worker_id, intervals
        self.units_done = 0
        self.tokens_done = 0
        self.lease_lost = threading.Event()
        self.cancel_requested = threading.Event()
        self._lock = threading.Condition()  # guards the queued state below; notified on records written
        self._sql = threading.Lock()  # one writer at a time: the thread or flush()
        self._records: list[ChunkRecord] = []
        self._queued = 0  # records queued so far, and of them written to the index (in order)
        self._written = 0
        self._records_now = False  # write the queued records at the next tick (records_written)
        self._fatal: BaseException | None = None  # not an Exception (e.g. SystemExit): ends the attempt
        self._phase: str | None = None
        self._units_total: int | None = None
        self._progress_due = False
        self._phase_new = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="qkvault-reporter")

    # -- the forward thread's side (no SQL) ------------------------------------------------------
    def phase(self, name: str, units_total: int | None = None) -> None:
        with self._lock:
            self._phase = name
            if units_total is not None:
                self._units_total = units_total
            self._progress_due = self._phase_new = True
        self._wake.set()

    def unit_done(self) -> None:
        with self._lock:
            self.units_done += 1
            self._progress_due = True

    def tokens(self, count: int) -> None:
        """``count`` more real tokens done (a bulk job's finished micro-batch)."""
        with self._lock:
            self.tokens_done += count
            self._progress_due = True

    def chunk_stored(self, record: ChunkRecord) -> None:
        """A stored chunk (from any thread): queued for the index."""
        with self._lock:
            self._records.append(record)
            self._queued += 1

    def records_written(self) -> None:
        """Returns once every chunk record queued so far is in the index, written by the reporter
        thread, which retries a failed batch (an index outage waits here; the job does not fail for
        it). Raises LeaseLost once the lease is lost, or what ended the reporter thread. Waits on
        SQL: never on the forward thread."""
        with self._lock:
            target = self._queued
            asked = 0.0
            while self._written < target:
                if not self._thread.is_alive():  # no reporter thread to write them: written below
                    break
                self._raise_if_ended()
                if time.monotonic() - asked >= RECORDS_RETRY_S:  # asked again after a failed write
                    asked = time.monotonic()
                    self._records_now = True
                    self._wake.set()
                self._lock.wait(0.1)
        if self._written < target:
            self._write_records()

    def _raise_if_ended(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id}: the index refused {self.worker_id}'s writes (lease lost)")

    def check_cancelled(self) -> None:
        """Raises LeaseLost or JobCancelled from two flags the reporter thread keeps fresh (or what
        ended the reporter thread, when it was not an Exception)."""
        self._raise_if_ended()
        if self.cancel_requested.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled; partial data kept")

    # -- the reporter thread --------------------------------------------------------------------
    def __enter__(self) -> JobReporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        intervals = self.intervals
        now = time.monotonic()
        last = {"beat": now, "cancel": now, "records": now, "progress": now}
        while not self._stop.is_set():
            self._wake.wait(intervals.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            try:
                if now - last["cancel"] >= intervals.progress_interval_s:
                    last["cancel"] = now
                    if self.index.is_cancel_requested(self.job_id):
                        self.cancel_requested.set()
                if now - last["beat"] >= intervals.heartbeat_interval_s:
                    last["beat"] = now
                    if not self.index.heartbeat(self.job_id, self.worker_id):
                        self.lease_lost.set()
                        return
                if self._records_now or now - last["records"] >= intervals.record_interval_s:
                    last["records"] = now
                    self._records_now = False
                    self._write_records()
                if self._phase_new or now - last["progress"] >= intervals.progress_interval_s:
                    last["progress"] = now
                    self._write_progress()
            except LeaseLost:
                self.lease_lost.set()
                return
            except Exception:  # a failed write stays queued; the lease tolerates a missed beat
                log.warning("job %s: index write failed; retrying", self.job_id, exc_info=True)
            except BaseException as exc:
                self._fatal = exc
                return

    def _write_records(self) -> None:
        with self._sql:
            with self._lock:
                records, self._records = self._records, []
            if not records:
                return
            try:
                self.index.record_chunks(self.job_id, records, worker=self.worker_id)
            except BaseException:
                with self._lock:  # keep them for the next try, first in line
                    self._records[:0] = records
                raise
            with self._lock:
                self._written += len(records)
                self._lock.notify_all()

    def _write_progress(self) -> None:
        with self._sql:
            with self._lock:
                if not self._progress_due:
                    return
                phase, total, done = self._phase, self._units_total, self.units_done
                tokens = self.tokens_done or None
            if self.index.update_progress(
                self.job_id,
                phase=phase,
                units_total=total,
                units_done=done,
                tokens_done=tokens,
                worker=self.worker_id,
            ):
                self.cancel_requested.set()
            with self._lock:
                self._phase_new = False
                self._progress_due = self.units_done != done or (self.tokens_done or None) != tokens

    def flush(self) -> None:
        """Write every queued record and the latest progress now, from the calling thread."""
        self._write_records()
        self._write_progress()
