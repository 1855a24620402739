"""storage/bundle/smallarrays.py: arrays written without zarr give the files zarr writes, byte for
byte, and BundleWriter.write_array's direct path equals zarr's setitem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.bundle.chunkstore import ChunkStore
from storage.bundle.smallarrays import NewArray, create_arrays

RNG = np.random.default_rng(0)
CASES = [
    NewArray("probs", (2, 3, 5), (2, 3, 5), "float32", float("nan"), ("layer", "batch", "head"), "lz4",
             RNG.random((2, 3, 5), dtype=np.float32)),
    NewArray("half", (4, 7), (4, 7), "float16", float("nan"), ("a", "b"), "zstd",
             RNG.random((4, 7)).astype(np.float16)),
    NewArray("tokens", (3, 9), (3, 9), "int32", -1, ("batch", "position"), "lz4",
             RNG.integers(-1, 50_000, (3, 9), dtype=np.int32)),
    NewArray("sequence", (6,), (6,), "int64", 0, ("batch",), "lz4", np.arange(6, dtype=np.int64) * 2**40),
    NewArray("flags", (5,), (5,), "bool", False, ("x",), "lz4", np.array([1, 0, 1, 1, 0], dtype=bool)),
    NewArray("codes", (2, 2, 8), (1, 1, 8), "uint8", 0, ("layer", "batch", "d"), "lz4",
             RNG.integers(0, 255, (2, 2, 8), dtype=np.uint8)),  # several chunks: through zarr
    NewArray("label", (2, 3), (2, 3), "str", "", ("layer", "head"), "lz4", np.array([["a", "bb", ""]] * 2)),
    NewArray("empty", (0, 4), (0, 4), "float32", float("nan"), ("layer", "head"), "lz4",
             np.zeros((0, 4), np.float32)),
]  # fmt: skip


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _through_zarr(group: zarr.Group, case: NewArray) -> zarr.Array:
    """``case`` created by zarr's own API (the reference)."""
    return group.create_array(
        case.name,
        shape=case.shape,
        chunks=case.chunks,
        dtype=case.dtype,
        fill_value=case.fill_value,
        dimension_names=case.dims,
        compressors=case.compressors(),
        config={"write_empty_chunks": True},
    )


def test_direct_arrays_are_the_files_zarr_writes(tmp_path: Path) -> None:
    assert [a.direct for a in CASES] == [True, True, True, True, True, False, False, False]
    mine, theirs = tmp_path / "mine", tmp_path / "zarr"
    store = ChunkStore(str(mine))
    group = zarr.open_group(store.zarr(), mode="a", zarr_format=3).require_group("summary")
    handles = create_arrays(group, CASES, store.put)
    assert sorted(handles) == ["codes", "empty", "label"]  # the others need no handle
    reference = zarr.open_group(str(theirs), mode="a", zarr_format=3).require_group("summary")
    for case in CASES:
        assert case.data is not None
        _through_zarr(reference, case)[...] = case.data
    written, expected = _files(mine), _files(theirs)
    assert sorted(written) == sorted(expected)
    for key, data in expected.items():
        if key.endswith("zarr.json"):
            assert json.loads(written[key]) == json.loads(data), key
        else:
            assert written[key] == data, key
    reread = zarr.open_group(str(mine), mode="r", zarr_format=3)["summary"]
    assert isinstance(reread, zarr.Group)
    for case in CASES:
        np.testing.assert_array_equal(np.asarray(reread[case.name]), case.data)


def test_arrays_without_data_are_zarr_s_metadata_and_their_handles_read_and_write(tmp_path: Path) -> None:
    """New numeric arrays created before their data (a bundle's row-block arrays): only their
    ``zarr.json``, zarr's own document; the handles returned act as zarr's (several chunks)."""
    cases = [
        NewArray(c.name, c.shape, (1, *c.shape[1:]) if len(c.shape) > 1 else c.shape, c.dtype, c.fill_value,
                 c.dims, c.compression)
        for c in CASES
        if c.dtype != "str" and c.data is not None and c.data.size
    ]  # fmt: skip
    assert all(c.direct for c in cases)
    mine, theirs = tmp_path / "mine", tmp_path / "zarr"
    store = ChunkStore(str(mine))
    handles = create_arrays(
        zarr.open_group(store.zarr(), mode="a", zarr_format=3), cases, store.put, handles=True
    )
    reference = zarr.open_group(str(theirs), mode="a", zarr_format=3)
    for case in cases:
        _through_zarr(reference, case)
    written, expected = _files(mine), _files(theirs)
    assert sorted(written) == sorted(expected) and all(k.endswith("zarr.json") for k in written)
    for key, data in expected.items():
        assert json.loads(written[key]) == json.loads(data), key
    for case, source in zip(cases, (c for c in CASES if c.name in handles), strict=True):
        handle = handles[case.name]
        assert handle.shape == case.shape and handle.chunks == case.chunks
        theirs_metadata = reference[case.name].metadata
        assert json.dumps(handle.metadata.to_dict()) == json.dumps(theirs_metadata.to_dict())  # NaN ≠ NaN
        assert source.data is not None
        handle[...] = source.data  # through the handle, every chunk
        np.testing.assert_array_equal(np.asarray(zarr.open_array(str(mine / case.name))), source.data)


def test_an_existing_array_is_replaced_through_zarr(tmp_path: Path) -> None:
    store = ChunkStore(str(tmp_path / "b"))
    group = zarr.open_group(store.zarr(), mode="a", zarr_format=3)
    first = CASES[0]
    create_arrays(group, [first], store.put)
    again = NewArray(first.name, (1, 2, 4), (1, 2, 4), "float32", float("nan"), first.dims, "lz4",
                     np.ones((1, 2, 4), np.float32))  # fmt: skip
    assert set(create_arrays(group, [again], store.put)) == {first.name}  # an earlier attempt's: zarr
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(tmp_path / "b" / first.name))), again.data)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("probs", "tokens", "flags")], ids=str)
def test_write_array_direct_path_equals_zarr(tmp_path: Path, case: NewArray) -> None:
    from storage.bundle.writer import BundleWriter

    writer = BundleWriter(str(tmp_path / "w"))
    writer.create_root({}, format_version="1.5")
    empty = NewArray(
        case.name, case.shape, case.chunks, case.dtype, case.fill_value, case.dims, case.compression
    )
    made = create_arrays(writer.group, [empty], writer.chunks.put, handles=True)
    assert empty.direct and set(made) == {case.name}  # its metadata only, its handle without I/O
    writer._arrays.update(made)
    assert case.data is not None
    writer.write_array(case.name, case.data)
    reference = zarr.open_array(str(tmp_path / "w" / case.name), mode="r+")
    stored = (tmp_path / "w" / case.name / "c").rglob("*")
    chunk = next(p for p in stored if p.is_file()).read_bytes()
    reference[...] = case.data  # zarr's own bytes for the same data
    assert next(p for p in (tmp_path / "w" / case.name / "c").rglob("*") if p.is_file()).read_bytes() == chunk
    np.testing.assert_array_equal(np.asarray(reference), case.data)


def _documents(root: Path) -> dict[str, bytes]:
    """Every node's stored ``zarr.json`` by key, as a writer's ChunkStore holds them."""
    return {k: v for k, v in _files(root).items() if k.endswith("zarr.json")}


def test_consolidated_root_holds_every_node_as_zarr_s_consolidation_does(tmp_path: Path) -> None:
    """consolidated_root (compact JSON, C-encoded) holds the nodes zarr.consolidate_metadata puts
    in, and the root's attributes with the final ones merged in."""
    from storage.bundle.consolidated import consolidated_root

    store = ChunkStore(str(tmp_path / "b"))
    root = zarr.open_group(store.zarr(), mode="a", zarr_format=3)
    root.update_attributes({"job_id": "j", "nested": {"a": [1, 2, {"b": None}]}})
    create_arrays(root.require_group("summary"), CASES, store.put)
    create_arrays(
        root, [NewArray("tokens", (3, 9), (1, 9), "int32", -1, ("batch", "position"), "lz4")], store.put
    )
    documents = _documents(tmp_path / "b")
    attrs = {"complete": True, "timings_s": {"total": 1.5}, "text": "naïve ✓"}
    ours = json.loads(consolidated_root(documents, attrs))
    assert "\n" not in consolidated_root(documents, attrs).decode()
    assert ours["attributes"] == {"job_id": "j", "nested": {"a": [1, 2, {"b": None}]}, **attrs}
    zarr.consolidate_metadata(store.zarr())
    theirs = json.loads((tmp_path / "b" / "zarr.json").read_bytes())["consolidated_metadata"]["metadata"]
    assert json.dumps(ours["consolidated_metadata"]["metadata"], sort_keys=True) == json.dumps(
        theirs, sort_keys=True
    )
    reopened = zarr.open_consolidated(str(tmp_path / "b"), zarr_format=3)
    summary = reopened["summary"]
    assert isinstance(summary, zarr.Group) and sorted(summary.array_keys()) == sorted(c.name for c in CASES)


def test_a_failed_put_is_raised_once_every_other_put_ended(tmp_path: Path) -> None:
    """Objects are stored by a pool of the process: an error is raised after every other object
    of the call was stored (as each write on its own would leave them), and the pool goes on."""
    store = ChunkStore(str(tmp_path / "b"))
    group = zarr.open_group(store.zarr(), mode="a", zarr_format=3)
    stored: list[str] = []

    def put(key: str, data: bytes) -> None:
        if key.startswith("half/c"):
            raise OSError("disk full")
        store.put(key, data)
        stored.append(key)

    numeric = [c for c in CASES if c.direct]
    with pytest.raises(OSError, match="disk full"):
        create_arrays(group, numeric, put)
    assert len(stored) == 2 * len(numeric) - 1  # every zarr.json and chunk but the one that failed
    create_arrays(
        zarr.open_group(ChunkStore(str(tmp_path / "c")).zarr(), mode="a"),
        numeric,
        ChunkStore(str(tmp_path / "c")).put,
    )
    assert len(_documents(tmp_path / "c")) == len(numeric) + 1
