"""A write killed between its temporary file and the rename leaves ``.<name>.<hex>.partial`` in a
local bundle; the writer that finishes that directory removes it (and nothing else)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from storage.bundle.chunkstore import ChunkStore
from storage.bundle.writer import BundleWriter


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_finalize_removes_the_temporary_files_of_killed_writes_in_its_own_directory(tmp_path: Path) -> None:
    bundle = tmp_path / "job.zarr"
    first = BundleWriter(str(bundle))  # the killed attempt
    first.create_root({"job_id": "j"}, format_version="2.0", children=("batches",))
    BundleWriter(str(bundle / "batches" / "000001"), key_prefix="batches/000001/").create_root(
        {}, format_version="2.0"
    )
    # what a SIGKILL between open() and os.replace() leaves: in this micro-batch and in another one
    own = bundle / "batches/000001/table/length/.zarr.json.0123abcd.partial"
    other = bundle / "batches/000002/c/.0.4567ef.partial"
    for path in (own, other):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"torn")
    # the next attempt
    root = BundleWriter(str(bundle))
    root.create_root({"job_id": "j"}, format_version="2.0", children=("batches",))
    batch = BundleWriter(str(bundle / "batches" / "000001"), key_prefix="batches/000001/")
    batch.create_root({}, format_version="2.0")
    batch.write_group("table", {"length": (("batch",), np.arange(4, dtype=np.int32))})
    before = _files(bundle)

    batch.finalize({}, consolidate=False)
    assert not own.exists() and other.exists()  # another group may be mid-write: left alone
    assert _files(bundle) == before - {own.relative_to(bundle).as_posix()}
    length = zarr.open_array(str(bundle / "batches/000001/table/length"), mode="r")
    assert np.asarray(length[:]).tolist() == [0, 1, 2, 3]

    root.finalize({"bulk": {}}, consolidate=False)  # the job's last write: the whole bundle
    assert not other.exists()
    assert not any(name.endswith(".partial") for name in _files(bundle))


def test_a_directory_that_began_empty_is_not_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer whose directory was empty when it began (a new micro-batch group, a job's first
    attempt) finds no temporary files to remove: its own writes leave none (a failed write removes
    its file), and no killed process wrote there before it. It does not search the directory."""
    searched: list[Path] = []
    real = Path.rglob

    def rglob(self: Path, pattern: str) -> Any:
        searched.append(self)
        return real(self, pattern)

    monkeypatch.setattr(Path, "rglob", rglob)
    writer = BundleWriter(str(tmp_path / "job.zarr"))
    writer.create_root({"job_id": "j"}, format_version="2.0")
    writer.write_group("table", {"length": (("batch",), np.arange(4, dtype=np.int32))})
    writer.finalize({}, consolidate=False)
    assert searched == []
    assert not any(name.endswith(".partial") for name in _files(tmp_path))
    searched.clear()
    again = BundleWriter(str(tmp_path / "job.zarr"))  # a later attempt: the directory holds files
    again.create_root({"job_id": "j"}, format_version="2.0")
    again.finalize({}, consolidate=False)
    assert searched == [tmp_path / "job.zarr"]


def test_an_s3_store_has_no_leftovers_to_remove() -> None:
    assert ChunkStore("s3://bucket/job.zarr", storage_options={"anon": True}).remove_leftovers() == []


def test_a_local_write_stores_every_byte_through_a_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk reaches its name whole even where the OS takes a few bytes per write; until the
    rename it is ``.<name>.<hex>.partial`` beside it (the name :meth:`remove_leftovers` looks for),
    each write's name its own."""
    import os

    import storage.bundle.chunkstore as chunkstore

    names: list[str] = []
    real_write, real_replace = os.write, os.replace

    def few_bytes(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:3]))

    def replace(source: str, target: str) -> None:
        names.append(os.path.basename(source))
        real_replace(source, target)

    monkeypatch.setattr(chunkstore.os, "write", few_bytes)
    monkeypatch.setattr(chunkstore.os, "replace", replace)
    store = ChunkStore(str(tmp_path / "job.zarr"))
    data = bytes(range(256)) * 4
    store.put("q/c/0/0", data)
    store.put("q/c/0/1", data[::-1])
    assert (tmp_path / "job.zarr/q/c/0/0").read_bytes() == data
    assert (tmp_path / "job.zarr/q/c/0/1").read_bytes() == data[::-1]
    assert len(names) == 2 and names[0] != names[1]
    assert all(n.startswith(f".{i}.") and n.endswith(".partial") for n, i in zip(names, (0, 1), strict=True))
    assert sorted(_files(tmp_path)) == ["job.zarr/q/c/0/0", "job.zarr/q/c/0/1"]
