"""storage/bundle/consolidated.py: the consolidated metadata a writer builds from the documents it
stored equals what ``zarr.consolidate_metadata`` writes after reading them back, for real bundles
(a one-batch export with every kind of node, a bulk job's micro-batch groups); a writer that did
not store every document (a directory that held files when it began) leaves it to zarr."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from storage.bundle.chunkstore import ChunkStore
from storage.jobs.spec import JobSpec
from worker.bulk import BulkExporter

from .conftest import CollectingHooks
from .export_helpers import export, loaded

SPEC: dict[str, Any] = {
    "prompts": ["The quick brown fox jumps over the lazy dog", "a b c"],
    "generation": {"max_new_tokens": 2},
    "capture": {"attention": True, "qkv": True, "hidden_states": True, "summary": True},
    "kv_compression": [{"method": "kivi", "bits": 2}],
}


def _root(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((path / "zarr.json").read_bytes())
    return document


def _without_documents(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Writers fall back to zarr's consolidation; returns a list that records each fallback."""
    fallbacks: list[bool] = []

    def unknown(self: ChunkStore) -> None:
        fallbacks.append(True)

    monkeypatch.setattr(ChunkStore, "documents", unknown)
    return fallbacks


def test_an_export_s_consolidated_metadata_equals_zarr_s(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = {**SPEC, "model": {"id": str(tiny_model_dir("llama"))}}
    ours, _, _ = export(spec, tmp_path / "ours.zarr")
    mine = _root(tmp_path / "ours.zarr")
    nodes = mine["consolidated_metadata"]["metadata"]
    assert {"attention", "q", "hidden_states", "summary", "kv/kivi_2"} <= set(nodes), sorted(nodes)
    assert mine["attributes"]["complete"] is True and "certificate" in mine["attributes"]
    with monkeypatch.context() as patched:
        fallbacks = _without_documents(patched)
        export(spec, tmp_path / "zarr.zarr")
    assert fallbacks  # the reference went through zarr.consolidate_metadata
    theirs = _root(tmp_path / "zarr.zarr")
    for document in (mine, theirs):  # what differs between two runs of the same job
        document["attributes"].pop("timings_s")
    assert mine == theirs
    opened = zarr.open_consolidated(str(tmp_path / "ours.zarr"), zarr_format=3)
    assert sorted(opened.array_keys()) == sorted(zarr.open_group(str(tmp_path / "zarr.zarr")).array_keys())
    assert ours["attention"].shape[0] == 2


def test_a_bulk_job_s_micro_batch_groups_consolidate_as_zarr_does(
    tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = JobSpec.model_validate(
        {
            "model": {"id": str(tiny_model_dir("llama"))},
            "source": {"kind": "prompts", "prompts": ["one two three", "four", "five six"] * 3},
            "generation": {"max_new_tokens": 1},
            "capture": {"attention": "derived", "summary": True},
        }
    )
    lm = loaded(spec)
    BulkExporter(spec, lm, CollectingHooks(), bundle_url=str(tmp_path / "ours.zarr")).run("bulk-test")
    with monkeypatch.context() as patched:
        fallbacks = _without_documents(patched)
        BulkExporter(spec, lm, CollectingHooks(), bundle_url=str(tmp_path / "zarr.zarr")).run("bulk-test")
    batches = sorted(p.name for p in (tmp_path / "ours.zarr" / "batches").iterdir() if p.is_dir())
    assert batches and len(fallbacks) == len(batches)
    for name in batches:
        mine = _root(tmp_path / "ours.zarr" / "batches" / name)
        theirs = _root(tmp_path / "zarr.zarr" / "batches" / name)
        for document in (mine, theirs):
            document["attributes"].pop("timings_s")
        assert mine == theirs, name


def test_a_directory_that_held_files_is_consolidated_by_zarr(tmp_path: Path) -> None:
    from storage.bundle.writer import BundleWriter

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "left-by-an-earlier-attempt").write_bytes(b"")
    writer = BundleWriter(str(tmp_path / "b"))
    assert writer.chunks.documents() is None
    writer.create_root({"job_id": "j"}, format_version="1.5")
    writer.write_group("summary", {"entropy": (("head",), np.ones(3, np.float32))})
    writer.finalize({"done": 1})
    root = _root(tmp_path / "b")
    assert root["attributes"]["done"] == 1 and "summary/entropy" in root["consolidated_metadata"]["metadata"]


def test_a_root_whose_children_other_writers_fill_is_consolidated_by_zarr(tmp_path: Path) -> None:
    """A bulk-style root (``create_root(children=...)``): its store began empty but other writers
    fill its children, so their nodes come from zarr's reading of the store."""
    from storage.bundle.writer import BundleWriter

    root = BundleWriter(str(tmp_path / "b"))
    root.create_root({"job_id": "j"}, format_version="2.0", children=("batches",))
    child = BundleWriter(str(tmp_path / "b" / "batches" / "000000"), key_prefix="batches/000000/")
    child.create_root({}, format_version="2.0")
    child.write_group("table", {"length": (("batch",), np.arange(2, dtype=np.int32))})
    child.finalize({"complete_child": True})
    root.finalize({"done": 1})
    nodes = _root(tmp_path / "b")["consolidated_metadata"]["metadata"]
    assert {"batches", "batches/000000", "batches/000000/table/length"} <= set(nodes)
    assert nodes["batches/000000"]["attributes"]["complete_child"] is True
