"""Bulk jobs in-process (worker/bulk.py, storage/bundle/bulk.py; tiny Llama, local store): sequences
grouped in micro-batches, each sequence's arrays equal to exporting it alone, the table in the
job's order, partial reads, resume of finished micro-batches, and cancel between micro-batches."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from storage.bundle.bulk import open_bulk
from storage.bundle.labels import LABELS
from storage.bundle.reader import open_bundle, open_group
from storage.bundle.records import ChunkRecord
from storage.errors import JobCancelled
from storage.jobs.spec import JobSpec
from storage.sources.rows import SourceRowError
from worker import bulk as bulk_module
from worker.bulk import BulkExporter, JobLimitExceeded, JobLimits
from worker.capture.certify import micro_batch_layers

from .conftest import CollectingHooks
from .export_helpers import export, loaded

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "in",
    "the",
    "old",
    "oak",
    "tree",
]


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _spec(model: Path, source: dict[str, Any], **capture: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"id": str(model)},
            "source": {"token_budget": 256, "max_sequences": 6, **source},
            "generation": {"max_new_tokens": 3},
            "capture": {"attention": True, "qkv": True, "hidden_states": True, **capture},
            "storage": {"chunk_rows": 16, "attention_dtype": "float32"},
        }
    )


def _run(spec: JobSpec, out: Path, hooks: CollectingHooks | None = None, **kw: Any) -> dict[str, Any]:
    exporter = BulkExporter(spec, loaded(spec), hooks or CollectingHooks(), bundle_url=str(out), **kw)
    return exporter.run("bulk-test")


def test_each_sequence_equals_its_export_alone(tiny_model_dir: Any, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    prompts = _prompts(23)
    spec = _spec(model, {"kind": "prompts", "prompts": prompts})
    hooks = CollectingHooks()
    summary = _run(spec, tmp_path / "bulk.zarr", hooks)
    assert summary["sequences"] == 23 and summary["micro_batches"] >= 4
    assert summary["padding_fraction"] <= 0.05
    assert hooks.units == 23 and hooks.units_total == 23  # progress counts sequences
    bulk = open_bulk(tmp_path / "bulk.zarr")
    table = bulk.sequences
    assert table["sequence"].values.tolist() == list(range(23))
    assert table["text"].values.tolist() == prompts and table["source_row"].values.tolist() == list(range(23))
    assert bulk.attrs["complete"] is True and bulk.attrs["format_version"] == "2.0"
    # a micro-batch keeps its own texts, not a copy of every row of the job (which made a
    # micro-batch's metadata cost in proportion to the job: 5x on bench.bulk hidden states)
    group = zarr.open_group(str(tmp_path / "bulk.zarr"), path=bulk.batches()[0], mode="r")
    attrs: dict[str, Any] = dict(group.attrs)
    source = attrs["spec"]["source"]
    assert source["kind"] == "prompts" and "prompts" not in source and "prompts" not in bulk.attrs["source"]
    assert 0 < len(attrs["texts"]["prompts"]) == len(attrs["token_strings"]) < 23
    # micro-batch 0 certifies every exported layer, the later ones the layers in turn
    every = tuple(int(layer) for layer in attrs["certificate"]["layers"])
    assert len(every) > 1
    for k, path in enumerate(bulk.batches()):
        stored: dict[str, Any] = dict(zarr.open_group(str(tmp_path / "bulk.zarr"), path=path, mode="r").attrs)
        assert tuple(int(layer) for layer in stored["certificate"]["layers"]) == micro_batch_layers(every, k)
    for i in (0, 7, 22):
        alone, _, _ = export(
            {
                "model": {"id": str(model)},
                "prompts": [prompts[i]],
                "generation": {"max_new_tokens": 3},
                "capture": {"attention": True, "qkv": True, "hidden_states": True},
                "storage": {"chunk_rows": 16, "attention_dtype": "float32"},
            },
            tmp_path / f"alone-{i}.zarr",
        )
        one = bulk.sequence(i)
        n = int(alone["length"][0])
        assert int(table["length"].sel(sequence=i)) == n
        for name in ("attention", "q", "k", "hidden_states", "tokens"):
            ours = one[name].values
            theirs = alone[name].isel(batch=0).values
            cut = tuple(slice(0, s) for s in ours.shape)
            np.testing.assert_allclose(ours, theirs[cut], atol=2e-5, err_msg=f"sequence {i} {name}")


def test_a_resumed_job_skips_finished_micro_batches(tiny_model_dir: Any, tmp_path: Path) -> None:
    spec = _spec(tiny_model_dir("llama"), {"kind": "prompts", "prompts": _prompts(20, seed=1)})
    first = _run(spec, tmp_path / "ref.zarr")
    records: list[ChunkRecord] = []

    class CancelAfter(CollectingHooks):
        def unit_done(self) -> None:
            super().unit_done()
            if self.units >= 9:
                self.cancel_after_blocks = 0  # the next check cancels

    with pytest.raises(JobCancelled):
        _run(spec, tmp_path / "b.zarr", CancelAfter(), writer_options={"on_chunk": records.append})
    partial = open_bulk(tmp_path / "b.zarr")
    assert partial.attrs["partial"] is True
    finished = partial.sequences.sizes["sequence"]
    assert 9 <= finished < 20  # cancel landed within one micro-batch, finished ones kept
    second = _run(spec, tmp_path / "b.zarr")
    assert second["resumed_micro_batches"] >= 1 and second["sequences"] == first["sequences"]
    again, ref = open_bulk(tmp_path / "b.zarr"), open_bulk(tmp_path / "ref.zarr")
    for i in range(20):
        np.testing.assert_array_equal(
            again.sequence(i)["attention"].values, ref.sequence(i)["attention"].values
        )


def test_token_id_rows_and_a_bad_row(tiny_model_dir: Any, tmp_path: Path) -> None:
    model = tiny_model_dir("llama")
    spec = _spec(model, {"kind": "token_ids", "token_ids": [[256, 70, 71], [256, 72], [256, 73, 74, 75]]})
    assert _run(spec, tmp_path / "ids.zarr")["sequences"] == 3
    tokens = open_bulk(tmp_path / "ids.zarr").sequence(2)["tokens"].values.tolist()
    assert tokens[:4] == [256, 73, 74, 75]
    long = _spec(model, {"kind": "token_ids", "token_ids": [[256, 1], [256] * 5000]})
    with pytest.raises(SourceRowError, match="source row 1 is too long for the model"):
        _run(long, tmp_path / "long.zarr")


def test_summary_over_the_dataset_and_per_sequence(tiny_model_dir: Any, tmp_path: Path) -> None:
    """The dataset-wide means are the row-weighted means of every sequence's means (numpy check)."""
    spec = _spec(
        tiny_model_dir("llama"),
        {"kind": "prompts", "prompts": _prompts(14, seed=2)},
        attention=False,
        qkv=False,
        hidden_states=False,
        summary=True,
        summary_params={"sink_tokens": 1, "local_window": 2},
    )
    _run(spec, tmp_path / "s.zarr")
    bulk = open_bulk(tmp_path / "s.zarr")
    overall = bulk.summary()
    weighted = np.zeros(overall["sink"].shape)
    rows = np.zeros(overall["rows"].shape)
    for i in range(14):
        one = open_group(
            bulk.sequence(i).encoding["source"],
            f"batches/{int(bulk.sequences['batch'].sel(sequence=i)):06d}/summary",
        )
        slot = int(bulk.sequences["slot"].sel(sequence=i))
        r = one["rows"].isel(batch=slot).values.astype(float)
        weighted += np.nan_to_num(one["sink"].isel(batch=slot).values) * r[:, None]
        rows += r
    np.testing.assert_allclose(overall["sink"].values, weighted / rows[:, None], rtol=1e-5)
    np.testing.assert_array_equal(overall["rows"].values, rows)
    assert set(overall["label"].values.ravel()) <= set(LABELS)


def test_open_bundle_gives_the_table_and_a_running_jobs_finished_micro_batches(
    tiny_model_dir: Any, tmp_path: Path
) -> None:
    spec = _spec(
        tiny_model_dir("llama"), {"kind": "prompts", "prompts": _prompts(12, seed=3)}, attention=False
    )
    seen: list[int] = []

    class Watching(CollectingHooks):
        def unit_done(self) -> None:  # a reader opens the bundle while the job runs
            super().unit_done()
            seen.append(open_bulk(tmp_path / "r.zarr").sequences.sizes["sequence"])

    _run(spec, tmp_path / "r.zarr", Watching())
    assert seen[-1] == 12 and seen[0] >= 1 and seen == sorted(seen)  # grows as micro-batches finish
    table = open_bundle(tmp_path / "r.zarr")
    assert table.sizes["sequence"] == 12 and table.attrs["bulk"]["padding_fraction"] <= 0.05


def test_the_job_limits_stop_a_source_larger_than_its_estimate(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission checks an estimate from a sample; the worker checks every row it reads and fails
    the job at the first one over a limit, keeping the micro-batches it finished (readable)."""
    monkeypatch.setattr(bulk_module, "DEFAULT_WINDOW", 4)  # plan 4 rows at a time
    model = tiny_model_dir("llama")
    spec = _spec(model, {"kind": "prompts", "prompts": _prompts(12), "max_sequences": 4}, qkv=False)
    out = tmp_path / "limited.zarr"
    with pytest.raises(JobLimitExceeded, match=r"source row 9 is sequence 10.*QKVAULT_MAX_SEQUENCES") as exc:
        _run(spec, out, limits=JobLimits(max_sequences=9, max_job_tokens=10**9))
    assert exc.value.detail == {"field": "source", "row": 9}
    kept = open_bulk(out)
    assert kept.sequences["sequence"].values.tolist() == list(range(8))  # two whole windows
    assert kept.attrs["partial"] is True

    with pytest.raises(JobLimitExceeded, match=r"to [0-9,]+ tokens .*QKVAULT_MAX_JOB_TOKENS"):
        _run(spec, tmp_path / "tokens.zarr", limits=JobLimits(max_sequences=100, max_job_tokens=60))
    assert _run(spec, tmp_path / "fits.zarr", limits=JobLimits(12, 10**9))["sequences"] == 12
