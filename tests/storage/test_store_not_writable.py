"""Store errors an operator can fix (disk full or over quota, read-only, permission denied) are
classified in one place (``storage.stores.objectstore.not_writable``) as ``StoreNotWritable``,
naming the resource, the errno and the fix, from every write path of a bundle: the bundle
directory, the chunk pipeline, zarr's own writes, deletes on a resumed attempt and the finalize.

Real disks where it matters: a tmpfs this module mounts (skipped, with the reason, where it cannot
mount), filled or remounted read-only. Permissions cannot be refused to root, so EACCES/EPERM are
classified from the errors the OS raises for them.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.bundle.checksum import checksum
from storage.bundle.chunkstore import ChunkStore
from storage.bundle.layout import BundleLayout
from storage.bundle.records import ChunkRecord
from storage.bundle.resume import ResumeSet
from storage.bundle.writer import BundleWriter
from storage.errors import StoreError, StoreNotWritable, StoreUnavailable
from storage.stores.objectstore import StoreRetry, is_transient, not_writable
from tests.faults import FaultyProxy, Tmpfs
from tests.services import S3Server

BUNDLE = "jobs/j.zarr"


def _layout() -> BundleLayout:
    return BundleLayout(
        batch=1,
        positions=8,
        layers=(0,),
        heads=(0, 1),
        kv_heads=(0,),
        head_dim=4,
        attention=True,
        qkv=True,
        attention_dtype="float16",
        qkv_dtype="float32",
        chunk_rows=4,
    )


@pytest.fixture(scope="module")
def mounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tmpfs]:
    with Tmpfs.mounted_or_skip(tmp_path_factory, 4 << 20) as disk:
        yield disk


@pytest.fixture
def disk(mounted: Tmpfs) -> Iterator[Tmpfs]:
    """The module's tmpfs, emptied, writable and without filler after each test."""
    yield mounted
    mounted.remount(read_only=False)
    mounted.free()
    for path in sorted(mounted.path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.ENOSPC, "free space on {mount} ("),
        (errno.EDQUOT, "raise the disk quota of the worker's user (uid {uid}) on {mount}"),
        (errno.EROFS, "remount {mount} read-write"),
        (errno.EACCES, "make {dir} writable by the worker's user (uid {uid}"),
        (errno.EPERM, "make {dir} writable by the worker's user (uid {uid}"),
    ],
)
def test_operator_fixable_errors_name_the_resource_the_errno_and_the_fix(
    tmp_path: Path, code: int, fix: str
) -> None:
    bundle = tmp_path / BUNDLE
    failed = bundle / "attention" / "c" / ".0.partial"
    exc = OSError(code, os.strerror(code), str(failed))
    if code in (errno.EACCES, errno.EPERM):
        exc = PermissionError(code, os.strerror(code), str(failed))
    found = not_writable(exc, str(bundle), "write attention/c/0")
    assert isinstance(found, StoreNotWritable) and isinstance(found, StoreError)
    mount = found.detail["mount"]
    assert os.path.ismount(mount) and str(tmp_path).startswith(mount.rstrip("/") + "/")
    name = errno.errorcode[code]
    expected = fix.format(mount=mount, uid=os.geteuid(), dir=failed.parent)
    assert found.detail | {"fix": None} == {
        "resource": str(bundle),
        "path": str(failed),
        "operation": "write attention/c/0",
        "errno": name,
        "reason": found.detail["reason"],
        "fix": None,
        "mount": mount,
    }
    assert found.detail["fix"].startswith(expected), found.detail["fix"]
    assert f"({name}) on write attention/c/0 in {bundle}: {expected}" in found.message
    problem = found.to_problem()
    assert problem["type"] == "store-not-writable" and problem["extra"]["errno"] == name
    assert not is_transient(exc) and not is_transient(found)  # the S3 retry leaves them alone


def test_other_errors_are_not_classified() -> None:
    for exc in (
        OSError(errno.EIO, "I/O error"),  # s3fs's 5xx: retried, then StoreUnavailable
        FileNotFoundError(errno.ENOENT, "missing"),
        OSError("no errno"),
        ValueError("not an OSError"),
        StoreUnavailable("down"),
    ):
        assert not_writable(exc, "/data/store/jobs/j.zarr", "write x") is None, exc
    assert is_transient(OSError(errno.EIO, "I/O error"))


def test_s3_access_denied_names_the_bucket_and_the_permissions() -> None:
    url = "s3://bucket/prefix/jobs/j.zarr"
    found = not_writable(PermissionError(errno.EACCES, "Access Denied"), url, "write zarr.json")
    assert found is not None and found.detail["errno"] == "EACCES" and "mount" not in found.detail
    assert found.detail["resource"] == url and "s3:PutObject" in found.detail["fix"] and url in found.message
    assert not_writable(OSError(errno.EIO, "503 Slow Down"), url, "write zarr.json") is None


def test_a_full_disk_is_store_not_writable_on_every_write_path(disk: Tmpfs) -> None:
    url = str(disk.path / BUNDLE)
    chunks = ChunkStore(url)
    disk.fill(leave_bytes=0)
    for key in ("x/c/0/0", "zarr.json"):  # a chunk (recorded) and a metadata document (not)
        with pytest.raises(StoreNotWritable) as raised:
            chunks.put(key, os.urandom(3 * 4096))
        assert raised.value.detail["errno"] == "ENOSPC" and raised.value.detail["operation"] == f"write {key}"
        assert raised.value.detail["mount"] == str(disk.path) and url in raised.value.message
    assert [p.name for p in Path(url).rglob("*") if p.is_file()] == []  # no torn or temporary file
    writer = BundleWriter(url)
    with pytest.raises(StoreNotWritable, match=r"\(ENOSPC\) on write .*zarr.json"):
        writer.create(_layout(), {})  # zarr's writes: once a plain StoreError, failed at once
    writer.close()


def test_a_read_only_disk_is_store_not_writable_when_creating_the_bundle_directory(disk: Tmpfs) -> None:
    disk.remount(read_only=True)
    with pytest.raises(StoreNotWritable) as raised:
        BundleWriter(str(disk.path / BUNDLE))
    assert raised.value.detail["errno"] == "EROFS"
    assert raised.value.detail["operation"] == "create the bundle directory"
    assert f"remount {disk.path} read-write" in raised.value.message


def test_deletes_of_a_resumed_attempt_on_a_read_only_disk(disk: Tmpfs) -> None:
    url = str(disk.path / BUNDLE)
    first = ChunkStore(url)
    group = zarr.open_group(first.zarr(), mode="a", zarr_format=3)
    group.create_array("x", shape=(4,), chunks=(2,), dtype="int32", config={"write_empty_chunks": True})[
        ...
    ] = 1
    data = (Path(url) / "x/c/0").read_bytes()
    resume = ResumeSet.from_records([ChunkRecord("x", (0,), "x/c/0", len(data), checksum(data))])
    disk.remount(read_only=True)
    again = zarr.open_group(ChunkStore(url, resume=resume).zarr(), mode="a", zarr_format=3)
    with pytest.raises(StoreNotWritable) as raised:  # overwrite deletes the unrecorded keys first
        again.create_array("x", shape=(4,), chunks=(2,), dtype="int32", overwrite=True)
    assert raised.value.detail["errno"] == "EROFS" and raised.value.detail["operation"].startswith(
        "delete x/"
    )


def test_finalize_raises_a_chunk_the_store_refused_before_marking_the_bundle_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = BundleWriter(str(tmp_path / "b.zarr"), write_threads=1, io_threads=1)
    writer.create(_layout(), {})
    files = writer.chunks._objects
    write = files.write

    def full_for_the_last_block(key: str, data: bytes) -> None:
        if key.startswith("q/c/0/0/0/1/"):  # the last row block's chunk: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(key, data)

    monkeypatch.setattr(files, "write", full_for_the_last_block)
    for block in range(2):
        writer.write_row_block("q", 0, 0, block, np.ones((2, 4, 4), dtype=np.float32))
    with pytest.raises(StoreNotWritable, match=r"\(ENOSPC\) on write q/c/0/0/0/1/0"):
        writer.finalize({})  # it wrote the root attributes with "complete": true before
    attrs = zarr.open_group(str(tmp_path / "b.zarr"), mode="r").attrs
    assert attrs["complete"] is False


def test_s3_refusing_the_credentials_is_store_not_writable_at_once(s3_server: S3Server) -> None:
    """An S3 403 is not retried for the store's retry budget: it names the bucket and the fix."""
    with FaultyProxy(s3_server.endpoint_url) as proxy:
        options = {
            **s3_server.storage_options(),
            "endpoint_url": proxy.endpoint_url,
            "config_kwargs": {"retries": {"max_attempts": 1}},
        }
        url = f"{s3_server.new_store_url()}/{BUNDLE}"
        chunks = ChunkStore(url, storage_options=options, retry=StoreRetry(deadline_s=30))
        chunks.put("x/c/0", b"before")
        proxy.mode = "denied"
        started = time.monotonic()
        with pytest.raises(StoreNotWritable) as raised:
            chunks.put("x/c/1", b"after")
        assert time.monotonic() - started < 5  # not retried for the 30 s budget
    assert raised.value.detail["errno"] == "EACCES" and raised.value.detail["resource"] == url
    assert "s3:PutObject" in raised.value.message and url in raised.value.message
