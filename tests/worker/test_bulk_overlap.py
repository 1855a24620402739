"""A bulk job's writes overlap the next micro-batch's forward passes (worker/bulk.py, ``_Drain``):
observed through the chunk records of the real writers (no timing): micro-batch 0's drain is held
in one of the store threads until the forward thread waits for it, which it does only once micro-batch 1's
forward passes ran — and before micro-batch 2 starts (at most one micro-batch drains). A drain's
failure fails the job, with the finished micro-batches kept readable."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage.bundle.bulk import open_bulk
from storage.bundle.records import ChunkRecord
from storage.errors import JobCancelled, StoreNotWritable
from storage.jobs.spec import JobSpec
from worker.bulk import BulkExporter

from .conftest import CollectingHooks
from .export_helpers import loaded
from .test_bulk_export import _prompts

HOLD_S = 20.0  # how long micro-batch 0's store threads wait for the forward thread (a failure)


def _batch(record: ChunkRecord) -> int:
    """The micro-batch of a chunk record's key (``batches/000003/...``; -1: the root's table)."""
    parts = record.key.split("/")
    return int(parts[1]) if parts[0] == "batches" else -1


def _hidden_spec(model: Path, n: int, seed: int) -> JobSpec:
    """Hidden states of ``n`` prompts, prefill only, micro-batches of at most 6 sequences."""
    source = {"kind": "prompts", "prompts": _prompts(n, seed=seed), "token_budget": 256, "max_sequences": 6}
    return JobSpec.model_validate(
        {
            "model": {"id": str(model)},
            "source": source,
            "generation": {"max_new_tokens": 0},
            "capture": {"attention": False, "hidden_states": True},
            "storage": {"chunk_rows": 16},
        }
    )


def test_a_micro_batch_drains_while_the_next_one_runs(tiny_model_dir: Any, tmp_path: Path) -> None:
    spec = _hidden_spec(tiny_model_dir("llama"), 16, seed=4)
    hooks = CollectingHooks()
    lock = threading.Lock()
    stored: list[int] = []  # micro-batch of every chunk stored, in order
    seen: dict[str, Any] = {}  # what held a chunk of micro-batch 0 saw when the forward thread waited
    exporter: BulkExporter | None = None

    def on_chunk(record: ChunkRecord) -> None:
        with lock:
            stored.append(_batch(record))
        hooks.chunk_stored(record)
        if _batch(record) != 0 or not threading.current_thread().name.startswith("qkvault-store"):
            return  # another micro-batch's, or a small array written by the drain's thread
        with lock:  # one store thread is held: the others go on storing (micro-batch 1's chunks)
            if "held" in seen:
                return
            seen["held"] = True
        # micro-batch 0's drain cannot end while one of its chunks is held here: hold it until the
        # forward thread waits for that drain and the other store threads stored micro-batch 1's
        # chunks (queued before the wait, stored a moment later: not a race the test should lose)
        assert exporter is not None
        waited = threading.Event()
        for _ in range(int(HOLD_S / 0.01)):
            drain = getattr(exporter, "drain", None)  # None: before the first micro-batch
            if drain is not None and drain.waiting.is_set():
                waited.set()
            with lock:
                next_stored = 1 in stored
            if waited.is_set() and next_stored:
                break
            threading.Event().wait(0.01)
        with lock:
            seen.update(
                released=waited.is_set(),
                stored=sorted(set(stored)),
                units=hooks.units,
                finished=open_bulk(tmp_path / "b.zarr").batches(),
            )

    exporter = BulkExporter(
        spec, loaded(spec), hooks, bundle_url=str(tmp_path / "b.zarr"), writer_options={"on_chunk": on_chunk}
    )
    summary = exporter.run("bulk-test")
    # the forward thread ran micro-batch 1 (its chunks stored) while micro-batch 0 was not finished
    # (no progress, its group not complete), then waited for it before starting micro-batch 2
    assert seen["released"] is True, "the forward thread never waited for micro-batch 0's drain"
    assert seen["stored"] == [0, 1] and seen["units"] == 0 and seen["finished"] == []
    assert exporter.drain is not None and exporter.drain.waits >= 1
    assert summary["timings_s"]["micro_batches_drain"] > 0
    assert "micro_batches_drain_wait" in summary["timings_s"]
    # the forward thread's seconds in the capture's hooks, part of the passes' own
    timings = summary["timings_s"]
    assert 0 < timings["micro_batches_prefill_capture_host"] < timings["micro_batches_prefill"]
    # every micro-batch finished, every sequence counted once, in the table in the job's order
    assert summary["micro_batches"] >= 3 and hooks.units == 16
    ours = open_bulk(tmp_path / "b.zarr")
    assert ours.attrs["complete"] is True and len(ours.batches()) == summary["micro_batches"]
    assert ours.sequences["sequence"].values.tolist() == list(range(16))
    for i in (0, 15):
        one = ours.sequence(i)
        assert one["hidden_states"].shape[1] == int(ours.sequences["length"].sel(sequence=i))
        assert np.isfinite(one["hidden_states"].values).all()
    # every chunk of every micro-batch recorded once
    keys = [r.key for r in hooks.records]
    assert len(keys) == len(set(keys)) and set(stored) == {-1, *range(summary["micro_batches"])}


def test_serial_drains_finish_each_micro_batch_before_the_next_starts(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    """``overlap_drains=False`` (``bench.bulk --serial-drains``): when micro-batch k + 1 stores its
    first chunk, micro-batch k is already finished (written, counted)."""
    spec = _hidden_spec(tiny_model_dir("llama"), 16, seed=4)
    hooks = CollectingHooks()
    finished_at_start: dict[int, int] = {}  # micro-batch -> finished micro-batches at its first chunk
    exporter: BulkExporter | None = None

    def on_chunk(record: ChunkRecord) -> None:
        hooks.chunk_stored(record)
        assert exporter is not None
        finished_at_start.setdefault(_batch(record), exporter.finished_batches)

    exporter = BulkExporter(
        spec,
        loaded(spec),
        hooks,
        bundle_url=str(tmp_path / "b.zarr"),
        writer_options={"on_chunk": on_chunk},
        overlap_drains=False,
    )
    summary = exporter.run("bulk-test")
    batches = summary["micro_batches"]
    assert batches >= 3 and hooks.units == 16
    assert [finished_at_start[k] for k in range(batches)] == list(range(batches))
    streamed = [r for r in hooks.records if _batch(r) >= 0 and r.key.split("/")[2] == "hidden_states"]
    assert summary["writer"]["chunks"] == len(streamed) > 0


def test_a_micro_batch_is_marked_complete_only_after_its_chunk_records_were_written(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    """An attempt skips a micro-batch it finds complete: each drain has every chunk record handed
    over so far written (``records_written``) before its group says complete, so a kill between
    the two cannot leave a complete micro-batch whose chunks the index never heard of."""
    spec = _hidden_spec(tiny_model_dir("llama"), 16, seed=4)
    hooks = CollectingHooks()
    out = tmp_path / "b.zarr"
    lock = threading.Lock()
    pending: list[ChunkRecord] = []  # handed to on_chunk, not yet "in the index"
    complete_while_pending: list[int] = []

    def complete(batch: int) -> bool:
        document = out / f"batches/{batch:06d}" / "zarr.json"
        return document.exists() and '"complete": true' in document.read_text()

    def on_chunk(record: ChunkRecord) -> None:
        hooks.chunk_stored(record)
        with lock:
            pending.append(record)

    def records_written() -> None:
        with lock:
            batches = {_batch(r) for r in pending if _batch(r) >= 0}
            complete_while_pending.extend(b for b in batches if complete(b))
            pending.clear()

    exporter = BulkExporter(
        spec,
        loaded(spec),
        hooks,
        bundle_url=str(out),
        writer_options={"on_chunk": on_chunk},
        records_written=records_written,
    )
    summary = exporter.run("bulk-test")
    assert summary["micro_batches"] >= 3 and complete_while_pending == []
    # what no drain asked to write is only the root's own arrays (the job's finish flushes them)
    assert {_batch(r) for r in pending} <= {-1}
    assert any("/hidden_states/" in r.key for r in hooks.records)


class DiskFull(StoreNotWritable):
    """The store refusing micro-batch 1's small arrays (written by its drain)."""


def test_a_failed_drain_fails_the_job_and_keeps_the_finished_micro_batches(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    spec = _hidden_spec(tiny_model_dir("llama"), 16, seed=4)
    hooks = CollectingHooks()
    raised: list[BaseException] = []

    def on_chunk(record: ChunkRecord) -> None:
        hooks.chunk_stored(record)
        if record.key.startswith("batches/000001/length/"):  # written by micro-batch 1's drain
            error = DiskFull("disk full (test)")
            raised.append(error)
            raise error

    out = tmp_path / "failed.zarr"
    exporter = BulkExporter(
        spec, loaded(spec), hooks, bundle_url=str(out), writer_options={"on_chunk": on_chunk}
    )
    with pytest.raises(DiskFull) as exc:
        exporter.run("bulk-test")
    assert raised and exc.value is raised[0]  # the drain's own error, surfaced on the job's thread
    kept = open_bulk(out)
    assert kept.batches() == ["batches/000000"]  # micro-batch 1 is not marked complete
    first = kept.sequences
    assert first.attrs["partial_table"] is True and hooks.units == first.sizes["sequence"] > 0
    assert np.isfinite(kept.sequence(int(first["sequence"][0]))["hidden_states"].values).all()
    # the job stopped within one micro-batch of the failure: micro-batch 3 never started
    assert max(_batch(r) for r in hooks.records) <= 2


def test_a_cancel_during_a_drain_keeps_the_draining_micro_batch(tiny_model_dir: Any, tmp_path: Path) -> None:
    """Micro-batch 0 is held in its drain (one chunk in a store thread; the other store threads go
    on) until micro-batch 1's forward passes were cancelled: the job stops there, micro-batch 0 is
    still written whole and counted, the root marked partial."""
    spec = _hidden_spec(tiny_model_dir("llama"), 16, seed=4)
    cancelled = threading.Event()

    class CancelInBatchOne(CollectingHooks):
        def check_cancelled(self) -> None:
            if any(_batch(r) == 1 for r in list(self.records)):  # micro-batch 1 is running
                cancelled.set()
                raise JobCancelled("cancelled by test")

    hooks = CancelInBatchOne()
    held: list[bool] = []
    holding: list[int] = []
    lock = threading.Lock()

    def on_chunk(record: ChunkRecord) -> None:
        hooks.chunk_stored(record)
        if _batch(record) != 0 or not threading.current_thread().name.startswith("qkvault-store"):
            return
        with lock:  # one store thread is held: the others store micro-batch 1's chunks
            holding.append(0)
            if len(holding) > 1:
                return
        held.append(cancelled.wait(HOLD_S))

    out = tmp_path / "cancelled.zarr"
    exporter = BulkExporter(
        spec, loaded(spec), hooks, bundle_url=str(out), writer_options={"on_chunk": on_chunk}
    )
    with pytest.raises(JobCancelled):
        exporter.run("bulk-test")
    assert held == [True], "micro-batch 1 was not cancelled while micro-batch 0 drained"
    kept = open_bulk(out)
    assert kept.attrs["partial"] is True and kept.batches() == ["batches/000000"]
    table = kept.sequences
    assert "partial_table" not in table.attrs  # the root's table, written at the cancel
    assert set(table["batch"].values.tolist()) == {0} and hooks.units == table.sizes["sequence"]
    assert max(_batch(r) for r in hooks.records) == 1  # micro-batch 2 never started


def test_a_micro_batch_waits_for_its_device_figures_on_the_drain_thread(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a micro-batch that waits for the device (its summary, its certificate) runs on the
    drain thread, so the forward thread queues the next micro-batch's passes without waiting for
    this one's; what needs the tokenizer (the token strings) stays on the forward thread."""
    from worker.capture.metrics import HeadMetricsAccumulator
    from worker.export import Exporter

    threads: dict[str, set[str]] = {"host": set(), "device": set(), "summary": set()}

    def spied(name: str, real: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            threads[name].add(threading.current_thread().name)
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(Exporter, "_prepare_host", spied("host", Exporter._prepare_host))
    monkeypatch.setattr(Exporter, "_prepare_device", spied("device", Exporter._prepare_device))
    monkeypatch.setattr(HeadMetricsAccumulator, "result", spied("summary", HeadMetricsAccumulator.result))
    source = {"kind": "prompts", "prompts": _prompts(10, seed=2), "token_budget": 256, "max_sequences": 4}
    spec = JobSpec.model_validate(
        {
            "model": {"id": str(tiny_model_dir("llama"))},
            "source": source,
            "generation": {"max_new_tokens": 2, "stop_at_eos": False},
            "capture": {"detail": "summary", "summary_params": {"sink_tokens": 1, "local_window": 1}},
        }
    )
    summary = BulkExporter(spec, loaded(spec), CollectingHooks(), bundle_url=str(tmp_path / "b.zarr")).run(
        "t"
    )
    assert summary["micro_batches"] >= 3
    assert threads["host"] == {threading.main_thread().name}
    assert len(threads["device"]) == 1 and next(iter(threads["device"])).startswith("qkvault-drain")
    assert threads["summary"] == threads["device"]
    ours = open_bulk(tmp_path / "b.zarr")
    assert ours.attrs["complete"] is True
    assert np.isfinite(ours.summary()["k90"].values).all()
