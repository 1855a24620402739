"""storage/bundle/groups.py: a writer's groups opened without zarr's event loop read, merge and
store their attributes as ``zarr.open_group(mode="a")`` + ``update_attributes`` do, and say
whether the group is new (so nothing is listed for an earlier attempt's arrays)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.core.group import GroupMetadata

from storage.bundle.chunkstore import ChunkStore
from storage.bundle.groups import open_group
from storage.bundle.smallarrays import NewArray, create_arrays


def _document(path: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(path.read_bytes())
    return loaded


def test_a_new_group_is_created_with_its_attributes_and_said_new(tmp_path: Path) -> None:
    chunks = ChunkStore(str(tmp_path / "b"))
    group, fresh = open_group(chunks, attrs={"job_id": "j", "complete": False})
    assert fresh and dict(group.attrs) == {"job_id": "j", "complete": False}
    child, child_fresh = open_group(chunks, "summary")
    assert child_fresh and child.path == "summary"
    reread = zarr.open_group(str(tmp_path / "b"), mode="r", zarr_format=3)
    assert dict(reread.attrs) == {"job_id": "j", "complete": False}
    # the document zarr's own GroupMetadata writes for those attributes
    expected = GroupMetadata(attributes={"job_id": "j", "complete": False}, zarr_format=3).to_dict()
    assert _document(tmp_path / "b" / "zarr.json") == expected
    assert isinstance(reread["summary"], zarr.Group) and dict(reread["summary"].attrs) == {}


def test_an_earlier_attempt_s_attributes_are_merged_as_update_attributes_merges_them(tmp_path: Path) -> None:
    earlier = zarr.open_group(str(tmp_path / "b"), mode="a", zarr_format=3)
    earlier.update_attributes({"job_id": "j", "kept": [1, 2], "complete": True})
    earlier.create_array("old", shape=(2,), dtype="int32")
    reference = zarr.open_group(str(tmp_path / "r"), mode="a", zarr_format=3)
    reference.update_attributes({"job_id": "j", "kept": [1, 2], "complete": True})
    zarr.open_group(str(tmp_path / "r"), mode="a", zarr_format=3).update_attributes(
        {"complete": False, "new": "x"}
    )

    group, fresh = open_group(ChunkStore(str(tmp_path / "b")), attrs={"complete": False, "new": "x"})
    assert not fresh
    expected = dict(zarr.open_group(str(tmp_path / "r"), mode="r").attrs)
    assert dict(group.attrs) == expected == {"job_id": "j", "kept": [1, 2], "complete": False, "new": "x"}
    assert dict(zarr.open_group(str(tmp_path / "b"), mode="r").attrs) == expected
    assert list(group.array_keys()) == ["old"]  # the handle lists what is there


def test_require_semantics_leave_an_existing_group_as_it_is(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "b"), path="summary", mode="a", zarr_format=3).update_attributes({"a": 1})
    before = (tmp_path / "b" / "summary" / "zarr.json").read_bytes()
    group, fresh = open_group(ChunkStore(str(tmp_path / "b")), "summary")
    assert not fresh and dict(group.attrs) == {"a": 1}
    assert (tmp_path / "b" / "summary" / "zarr.json").read_bytes() == before  # not written again


def test_a_group_with_consolidated_metadata_is_left_to_zarr(tmp_path: Path) -> None:
    earlier = zarr.open_group(str(tmp_path / "b"), mode="a", zarr_format=3)
    earlier.create_array("x", shape=(3,), dtype="float32")
    with pytest.warns(UserWarning):
        zarr.consolidate_metadata(str(tmp_path / "b"), zarr_format=3)
    assert _document(tmp_path / "b" / "zarr.json").get("consolidated_metadata")
    group, fresh = open_group(ChunkStore(str(tmp_path / "b")), attrs={"complete": False})
    assert not fresh and group.attrs["complete"] is False
    assert dict(zarr.open_group(str(tmp_path / "b"), mode="r", use_consolidated=False).attrs) == {
        "complete": False
    }


def test_arrays_in_a_new_group_are_made_without_listing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``existing`` given (a group just created): create_arrays does not list the group; without it,
    an earlier attempt's array is found and replaced."""
    chunks = ChunkStore(str(tmp_path / "b"))
    group, fresh = open_group(chunks, attrs={})
    arrays = [
        NewArray("a", (2, 3), (2, 3), "float32", float("nan"), ("x", "y"), "lz4", np.ones((2, 3), np.float32))
    ]
    listed: list[bool] = []
    original = zarr.Group.array_keys

    def array_keys(self: zarr.Group) -> object:
        listed.append(True)
        return original(self)

    monkeypatch.setattr(zarr.Group, "array_keys", array_keys)
    create_arrays(group, arrays, chunks.put, existing=set() if fresh else None)
    assert not listed
    again, fresh = open_group(ChunkStore(str(tmp_path / "b")), attrs={"attempt": 2})
    replaced = [
        NewArray(
            "a", (1, 3), (1, 3), "float32", float("nan"), ("x", "y"), "lz4", np.zeros((1, 3), np.float32)
        )
    ]
    assert not fresh and set(create_arrays(again, replaced, chunks.put, existing=None)) == {"a"}
    assert listed
    np.testing.assert_array_equal(np.asarray(zarr.open_array(str(tmp_path / "b" / "a"))), np.zeros((1, 3)))
