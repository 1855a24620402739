"""storage/sources/readers.py + storage/stores/uploads.py: uploaded JSONL, Parquet and text files
streamed into a real store (a local directory, and moto's S3) and read back row by row; every bad
source raises SourceRowError naming the row; offset, limit and the seeded shuffle."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.sources import readers
from storage.sources.rows import SourceContext, SourceRow, SourceRowError, iter_rows
from storage.sources.spec import FileSource
from storage.stores.objectstore import ObjectStore
from storage.stores.uploads import (
    UPLOAD_DATA,
    UploadSink,
    UploadTooLarge,
    delete_upload,
    read_upload,
)

OWNER = "alice"


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(str(tmp_path / "store"))


def put(store: ObjectStore, data: bytes, upload_id: str = "up1", owner: str = OWNER, piece: int = 7) -> str:
    """Stream ``data`` into the store as an upload, in pieces of ``piece`` bytes."""
    sink = UploadSink(store, owner, upload_id, max_bytes=1 << 30)
    for start in range(0, len(data), piece):
        sink.write(data[start : start + piece])
    sink.commit()
    return upload_id


def rows(store: ObjectStore, owner: str = OWNER, **source: Any) -> list[SourceRow]:
    spec = FileSource.model_validate({"kind": "file", "upload": "up1", "format": "jsonl", **source})
    return list(iter_rows(spec, SourceContext(store=store, owner=owner)))


def error(store: ObjectStore, owner: str = OWNER, **source: Any) -> SourceRowError:
    with pytest.raises(SourceRowError) as info:
        rows(store, owner, **source)
    return info.value


def parquet_bytes(**columns: list[Any]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out, row_group_size=3)
    return out.getvalue()


def test_upload_is_stored_whole_with_its_size_and_hash(store: ObjectStore) -> None:
    import hashlib

    data = bytes(range(256)) * 9000  # 2.2 MiB, written in pieces
    put(store, data, piece=100_000)
    record = read_upload(store, OWNER, "up1")
    assert record is not None and record.complete
    assert (record.nbytes, record.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert store.read_bytes(store.upload_url(OWNER, "up1"), UPLOAD_DATA) == data
    assert read_upload(store, "bob", "up1") is None  # the owner is part of the key
    assert delete_upload(store, OWNER, "up1") and read_upload(store, OWNER, "up1") is None


def test_an_upload_past_the_limit_leaves_nothing(store: ObjectStore) -> None:
    sink = UploadSink(store, OWNER, "big", max_bytes=10)
    sink.write(b"12345")
    with pytest.raises(UploadTooLarge, match="QKVAULT_MAX_UPLOAD_BYTES"):
        sink.write(b"678901")
    assert read_upload(store, OWNER, "big") is None
    assert not Path(store.upload_url(OWNER, "big")).exists()


def test_jsonl_text_and_token_ids_with_line_numbers(store: ObjectStore) -> None:
    lines = [
        json.dumps({"text": "first", "other": 1}),
        "",
        "   ",
        json.dumps({"text": [5, 6, 7]}),
        json.dumps({"text": "café ☕"}) + "\r",  # a CRLF file
        json.dumps({"text": "last, no newline"}),
    ]
    put(store, b"\xef\xbb\xbf" + "\n".join(lines).encode())
    got = rows(store)
    assert [(r.index, r.row, r.text, r.token_ids) for r in got] == [
        (0, 0, "first", None),
        (1, 3, None, (5, 6, 7)),
        (2, 4, "café ☕", None),
        (3, 5, "last, no newline", None),
    ]
    assert [r.text for r in rows(store, field=None)] == [r.text for r in got]  # field defaults to text


def test_lines_split_across_pieces_read_the_same(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [json.dumps({"p": f"prompt {i} " + "x" * (i % 37)}) for i in range(300)]
    put(store, "\n".join(lines).encode(), piece=1 << 20)
    whole = [(r.row, r.text) for r in rows(store, field="p")]
    monkeypatch.setattr(readers, "PIECE_BYTES", 5)  # every line spans many pieces
    assert [(r.row, r.text) for r in rows(store, field="p")] == whole
    assert len(whole) == 300 and whole[299] == (299, "prompt 299 " + "x" * (299 % 37))


def test_text_format_one_prompt_per_line(store: ObjectStore) -> None:
    put(store, b"one\n\ntwo words\n  \nthree {not json}\n")
    got = rows(store, format="text")
    assert [(r.row, r.text) for r in got] == [(0, "one"), (2, "two words"), (4, "three {not json}")]


def test_parquet_text_and_token_id_columns(store: ObjectStore) -> None:
    texts = [f"row {i}" for i in range(8)]
    ids = [[i, i + 1] for i in range(8)]
    put(store, parquet_bytes(text=texts, ids=ids, other=list(range(8))), piece=1000)
    assert [r.text for r in rows(store, format="parquet")] == texts
    got = rows(store, format="parquet", field="ids")
    assert [r.token_ids for r in got] == [tuple(x) for x in ids] and [r.row for r in got] == list(range(8))


def test_offset_limit_and_seeded_shuffle(store: ObjectStore) -> None:
    put(store, "\n".join(f"p{i}" for i in range(50)).encode())
    assert [r.text for r in rows(store, format="text", offset=10, limit=5)] == [
        f"p{i}" for i in range(10, 15)
    ]
    first = [r.row for r in rows(store, format="text", shuffle_seed=3, shuffle_buffer=8)]
    again = [r.row for r in rows(store, format="text", shuffle_seed=3, shuffle_buffer=8)]
    other = [r.row for r in rows(store, format="text", shuffle_seed=4, shuffle_buffer=8)]
    assert first == again and first != other and first != list(range(50))
    assert sorted(first) == list(range(50))
    picked = rows(store, format="text", offset=20, limit=10, shuffle_seed=1)
    assert sorted(r.row for r in picked) == list(range(20, 30)) and [r.index for r in picked] == list(
        range(10)
    )
    with pytest.raises(SourceRowError, match=r"no rows left after source\.offset 50"):
        rows(store, format="text", offset=50)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"text": "ok"}\n{"text": "ok"}\nnot json\n', r"line 3 \(row 2\) is not JSON"),
        (b'{"text": "ok"}\n[1, 2]\n', r"line 2 \(row 1\) is a JSON list, not an object"),
        (
            b'{"text": "ok"}\n{"body": "x", "id": 3}\n',
            r"line 2 \(row 1\) has no field 'text' \(its fields: 'body', 'id'\)",
        ),
        (b'{"text": 42}\n', r"line 1 \(row 0\), field 'text' is 42: a sequence is a text or"),
        (b'{"text": ""}\n', r"line 1 \(row 0\), field 'text' is an empty text"),
        (b'{"text": [1, -2]}\n', r"line 1 \(row 0\), field 'text' is \[1, -2\]"),
        (b'{"text": [1.5]}\n', r"line 1 \(row 0\), field 'text' is \[1.5\]"),
        (b'{"text": [4294967296]}\n', r"line 1 \(row 0\), field 'text' is \[4294967296\]"),
        (
            b'{"text": "a\\ud800b"}\n',
            r"line 1 \(row 0\), field 'text' is not valid Unicode: a lone UTF-16 surrogate",
        ),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r"line 2 \(row 1\) is not UTF-8"),
        (b"", r"has no rows: the source is empty"),
        (b"\n  \n\n", r"has no rows: the source is empty"),
    ],
)
def test_bad_jsonl_names_the_row(store: ObjectStore, content: bytes, match: str) -> None:
    if content:
        put(store, content)
    else:
        UploadSink(store, OWNER, "up1", max_bytes=10).commit()
    with pytest.raises(SourceRowError, match=match):
        rows(store)


def test_a_line_too_long_is_named(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 100)
    put(store, b"short\n" + b"x" * 300 + b"\n")
    with pytest.raises(SourceRowError, match=r"line 2 \(row 1\) is longer than"):
        rows(store, format="text")


def test_bad_parquet_sources(store: ObjectStore) -> None:
    put(store, parquet_bytes(body=["a", "b"], n=[1, 2]))
    err = error(store, format="parquet")
    assert (
        "has no column 'text'; its columns: 'body', 'n'" in str(err) and err.detail["field"] == "source.field"
    )
    with pytest.raises(SourceRowError, match=r"row 0, column 'n' is 1: a sequence is a text"):
        rows(store, format="parquet", field="n")
    put(store, parquet_bytes(text=["a", None, "c"]), upload_id="up1")
    with pytest.raises(SourceRowError, match=r"row 1, column 'text' is None"):
        rows(store, format="parquet")
    put(store, b'{"text": "a jsonl file"}\n')
    with pytest.raises(SourceRowError, match="is not a readable Parquet file"):
        rows(store, format="parquet")


def test_uploads_are_read_only_for_their_owner(store: ObjectStore) -> None:
    put(store, b'{"text": "mine"}\n')
    assert [r.text for r in rows(store)] == ["mine"]
    err = error(store, owner="bob")
    assert "upload 'up1' not found" in str(err) and err.detail == {"field": "source.upload"}
    with pytest.raises(SourceRowError, match="no object store or job owner"):
        list(iter_rows(FileSource(kind="file", upload="up1", format="jsonl"), SourceContext(store=store)))


def test_a_field_is_refused_for_text_files() -> None:
    with pytest.raises(ValueError, match=r"source\.field is for jsonl and parquet files"):
        FileSource.model_validate({"kind": "file", "upload": "u", "format": "text", "field": "text"})


def test_uploads_on_s3_are_streamed_and_read_back(s3_server: Any, s3_store_url: str) -> None:
    store = ObjectStore(s3_store_url, storage_options=s3_server.storage_options())
    pad = "y" * 500
    lines = "\n".join(json.dumps({"text": f"s3 prompt {i} {pad}"}) for i in range(20_000)).encode()
    assert len(lines) > 9 << 20  # two multipart parts, ten read pieces
    put(store, lines, piece=1 << 20)
    record = read_upload(store, OWNER, "up1")
    assert record is not None and record.nbytes == len(lines)
    got = rows(store, offset=19_990)
    assert [r.text for r in got] == [f"s3 prompt {i} {pad}" for i in range(19_990, 20_000)]

    sink = UploadSink(store, OWNER, "aborted", max_bytes=1 << 30)
    sink.write(b"x" * (9 << 20))  # a multipart part already sent
    sink.abort()
    assert read_upload(store, OWNER, "aborted") is None
    assert not store.exists(store.upload_url(OWNER, "aborted"), UPLOAD_DATA)
