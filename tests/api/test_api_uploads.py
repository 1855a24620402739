"""``/v1/uploads`` and the admission of bulk jobs' sources, against the real app (TestClient, a
local store in ``tmp_path``; presigned uploads on moto's S3 behind the signature gate).

Uploads stream into the store (a body far larger than ``QKVAULT_MAX_REQUEST_BYTES`` and than one
piece), belong to their owner only, and stop at ``QKVAULT_MAX_UPLOAD_BYTES`` (413, nothing kept).
A job's ``file`` source is sampled at submission: a missing or foreign upload, a bad format, field
or first row is a 422 naming it; a dataset is sampled when this host has it."""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import uvicorn
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.app import create_app
from api.routes import uploads as upload_routes
from api.settings import ApiSettings
from qkvault.processes import free_port
from storage.index import Index
from storage.sources.rows import SourceContext, iter_rows
from storage.sources.spec import FileSource
from storage.stores.objectstore import ObjectStore
from storage.stores.uploads import UploadSink
from tests.api.s3_gate import GatedS3, gated_s3
from tests.api.support import SMOLLM2

JSONL = b"".join(json.dumps({"text": f"prompt {i}", "ids": [i + 1, 7]}).encode() + b"\n" for i in range(5))


def upload(client: TestClient, content: bytes | Iterator[bytes], **params: Any) -> Any:
    """POST the body to /v1/uploads (the answer: the TestClient's response)."""
    return client.post("/v1/uploads", content=content, params=params)


def bulk(client: TestClient, source: dict[str, Any], path: str = "/v1/jobs") -> Any:
    return client.post(path, json={"model": {"id": SMOLLM2}, "source": source})


def file_source(upload_id: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "file", "upload": upload_id, "format": "jsonl", **extra}


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture
def served(api_settings: ApiSettings, index: Index) -> Iterator[str]:
    """The app under uvicorn in this process (its body arrives in pieces, as deployed): base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(api_settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_an_upload_is_written_while_it_arrives(
    served: str, auth_headers: dict[str, str], store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    first_write = threading.Event()
    original = UploadSink.write

    def spy(self: UploadSink, piece: bytes) -> None:
        written.append(len(piece))
        original(self, piece)
        first_write.set()

    monkeypatch.setattr(UploadSink, "write", spy)
    data = bytes(range(256)) * 12_000  # 2.9 MiB: over QKVAULT_MAX_REQUEST_BYTES (1 MiB)
    seen_before_the_end: list[bool] = []

    def body() -> Iterator[bytes]:
        *head, last = list(pieces(data, 64 << 10))
        yield from head
        seen_before_the_end.append(first_write.wait(10))  # the server wrote before the body ended
        yield last

    with httpx.Client(base_url=served, headers=auth_headers, timeout=30) as http:
        response = http.post("/v1/uploads", content=body())
    assert response.status_code == 201, response.text
    assert seen_before_the_end == [True]
    assert len(written) >= 2 and max(written) <= upload_routes.PIECE_BYTES
    stored = store.read_bytes(store.upload_url("local", response.json()["id"]), "data")
    assert stored == data and response.json()["sha256"] == hashlib.sha256(data).hexdigest()


def test_an_upload_larger_than_a_request_is_stored_whole(client: TestClient, store: ObjectStore) -> None:
    data = bytes(range(256)) * 10_000 + b"end"  # 2.4 MiB: over QKVAULT_MAX_REQUEST_BYTES (1 MiB)
    response = upload(client, pieces(data, 64 << 10), filename="big.bin")  # chunked: no length

    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["nbytes"], body["sha256"], body["state"]) == (
        len(data),
        hashlib.sha256(data).hexdigest(),
        "complete",
    )
    assert body["filename"] == "big.bin" and response.headers["Location"] == f"/v1/uploads/{body['id']}"
    assert store.read_bytes(store.upload_url("local", body["id"]), "data") == data
    assert client.get(f"/v1/uploads/{body['id']}").json() == body


def test_uploads_belong_to_their_owner(
    client: TestClient, api_settings: ApiSettings, make_key: Callable[..., str]
) -> None:
    upload_id = upload(client, JSONL).json()["id"]
    assert bulk(client, file_source(upload_id)).status_code == 202
    for other in (make_key("bob"), make_key("root", admin=True)):
        headers = {"Authorization": f"Bearer {other}"}
        got = client.get(f"/v1/uploads/{upload_id}", headers=headers)
        assert got.status_code == 404 and got.json()["type"] == "upload-not-found"
        assert client.delete(f"/v1/uploads/{upload_id}", headers=headers).status_code == 404
        refused = client.post(
            "/v1/jobs", json={"model": {"id": SMOLLM2}, "source": file_source(upload_id)}, headers=headers
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["errors"][0]["loc"] == "body.source.upload"
        assert "no such upload of yours" in refused.json()["detail"]
    assert client.delete(f"/v1/uploads/{upload_id}").status_code == 204
    assert client.get(f"/v1/uploads/{upload_id}").status_code == 404
    assert client.get("/v1/uploads/..%2Fjobs").status_code in (404, 422)  # ids are [A-Za-z0-9_-]


@pytest.fixture
def small_limit_client(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str]
) -> Iterator[TestClient]:
    settings = api_settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as c:
        yield c


@pytest.mark.parametrize("chunked", [False, True])
def test_an_upload_past_the_limit_is_413_and_leaves_nothing(
    small_limit_client: TestClient, store: ObjectStore, chunked: bool
) -> None:
    data = b"x" * 2500
    response = upload(small_limit_client, pieces(data, 300) if chunked else data)
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["type"] == "upload-too-large" and body["setting"] == "QKVAULT_MAX_UPLOAD_BYTES"
    assert "QKVAULT_MAX_UPLOAD_BYTES" in body["detail"] and body["limit"] == 1000
    assert store.list_files(f"{store.root_url}/uploads") == []
    assert upload(small_limit_client, b"y" * 1000).status_code == 201  # at the limit: fine


def test_other_requests_keep_the_request_size_limit(client: TestClient) -> None:
    spec = {"model": {"id": SMOLLM2}, "prompts": ["x" * (2 << 20)]}
    assert client.post("/v1/jobs", json=spec).status_code == 413


def parquet(**columns: list[Any]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table(columns), out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("content", "source", "loc", "match"),
    [
        (b'{"text": "ok"}\nnot json\n', {}, "body.source.format", r"line 2 \(row 1\) is not JSON"),
        (
            b'{"body": "x"}\n',
            {},
            "body.source.field",
            r"line 1 \(row 0\) has no field 'text' \(its fields: 'body'\)",
        ),
        (JSONL, {"field": "prompt"}, "body.source.field", "has no field 'prompt'"),
        (b"\n\n", {}, "body.source", "has no rows"),
        (
            b'{"text": "a"}\n{"text": "b"}\n{"text": 3.5}\n',
            {},
            "body.source",
            r"line 3 \(row 2\), field 'text' is 3.5",
        ),
        (
            parquet(body=["a"]),
            {"format": "parquet"},
            "body.source.field",
            "has no column 'text'; its columns: 'body'",
        ),
        (JSONL, {"format": "parquet"}, "body.source.format", "not a readable Parquet file"),
        (b"\xff\xfe\n", {"format": "text"}, "body.source.format", r"line 1 \(row 0\) is not UTF-8"),
    ],
)
def test_bad_file_sources_are_refused_at_submission(
    client: TestClient, content: bytes, source: dict[str, Any], loc: str, match: str
) -> None:
    upload_id = upload(client, content).json()["id"]
    for path in ("/v1/jobs", "/v1/jobs/estimate"):
        response = bulk(client, file_source(upload_id, **source), path)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["type"] == "invalid-job-spec" and body["errors"][0]["loc"] == loc
        assert re.search(match, body["detail"]), body["detail"]


def test_good_file_sources_are_admitted(client: TestClient, store: ObjectStore) -> None:
    jsonl = upload(client, JSONL).json()["id"]
    assert bulk(client, file_source(jsonl, field="ids")).status_code == 202
    table = upload(client, parquet(prompt=["a", "b"], n=[1, 2])).json()["id"]
    assert bulk(client, file_source(table, format="parquet", field="prompt")).status_code == 202
    text = upload(client, b"one\ntwo\n").json()["id"]
    assert bulk(client, file_source(text, format="text", limit=1)).status_code == 202
    refused = bulk(client, file_source(text, format="text", field="text"))
    assert refused.status_code == 422 and "source.field is for jsonl and parquet" in refused.text
    rows = iter_rows(
        FileSource(kind="file", upload=jsonl, format="jsonl"), SourceContext(store=store, owner="local")
    )
    assert [r.text for r in rows] == [f"prompt {i}" for i in range(5)]  # what the worker will read


def test_inline_sequences_are_limited(client: TestClient, api_settings: ApiSettings, index: Index) -> None:
    app = create_app(api_settings.model_copy(update={"max_sequences": 3}))
    headers = dict(client.headers)
    with TestClient(app, raise_server_exceptions=False, headers=headers) as limited:
        ok = bulk(limited, {"kind": "prompts", "prompts": ["a", "b", "c"]})
        assert ok.status_code == 202, ok.text
        over = bulk(limited, {"kind": "token_ids", "token_ids": [[1], [2], [3], [4]]})
    assert over.status_code == 422
    body = over.json()
    assert (body["type"], body["setting"], body["value"], body["limit"]) == (
        "limit-exceeded",
        "QKVAULT_MAX_SEQUENCES",
        4,
        3,
    )
    assert body["errors"][0]["loc"] == "body.source.token_ids"


def test_dataset_sources_at_submission(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "datasets"
    (root / "org/prompts/data").mkdir(parents=True)
    (root / "org/prompts/data/train.jsonl").write_text('{"text": "a"}\n{"text": 7}\n')
    app = create_app(api_settings.model_copy(update={"datasets_dir": root}))
    with TestClient(app, raise_server_exceptions=False, headers=auth_headers) as client:

        def submit(**source: Any) -> Any:
            return bulk(client, {"kind": "dataset", "column": "text", **source})

        assert submit(path="org/prompts", limit=1).status_code == 422  # row 1 is sampled too
        bad_row = submit(path="org/prompts")
        assert "row 1, column 'text' is 7" in bad_row.json()["detail"]
        missing = submit(path="org/prompts", column="body")
        assert missing.status_code == 422 and missing.json()["errors"][0]["loc"] == "body.source.column"
        outside = submit(path=str(tmp_path))
        assert outside.status_code == 422 and "is not inside the datasets folder" in outside.json()["detail"]
        (root / "org/prompts/data/train.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
        assert submit(path="org/prompts").status_code == 202
        assert submit(path="org/elsewhere").status_code == 202  # not on this host: the worker checks


# -- presigned uploads (S3) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[GatedS3]:
    with gated_s3() as server:
        yield server


@pytest.fixture
def s3_client(
    api_settings: ApiSettings, index: Index, auth_headers: dict[str, str], s3: GatedS3
) -> Iterator[tuple[TestClient, ObjectStore]]:
    settings = api_settings.model_copy(
        update={
            "store_url": s3.new_store_url(),
            "s3_endpoint_url": s3.endpoint_url,
            "s3_access_key_id": s3.key,
            "s3_secret_access_key": SecretStr(s3.secret),
            "max_upload_bytes": 10_000,
        }
    )
    with TestClient(create_app(settings), raise_server_exceptions=False, headers=auth_headers) as client:
        yield client, ObjectStore.from_settings(settings)


@pytest.mark.integration
def test_a_presigned_put_uploads_straight_to_s3(s3_client: tuple[TestClient, ObjectStore]) -> None:
    client, store = s3_client
    created = upload(client, b"", presign="true", expires_in=60, filename="p.jsonl")
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["state"], body["upload_method"], body["nbytes"]) == ("pending", "PUT", None)
    pending = bulk(client, file_source(body["id"]))
    assert pending.status_code == 422 and "is pending" in pending.json()["detail"]

    with httpx.Client() as plain:  # no API key, no S3 credentials
        put = plain.put(body["upload_url"], content=JSONL)
        assert put.status_code == 200, put.text
        tampered = plain.put(body["upload_url"].replace("/data?", "/other?"), content=b"x")
        assert tampered.status_code == 403  # the URL writes that one object only

    got = client.get(f"/v1/uploads/{body['id']}").json()
    assert (got["state"], got["nbytes"], got["sha256"]) == ("complete", len(JSONL), None)
    assert bulk(client, file_source(body["id"])).status_code == 202
    source = FileSource(kind="file", upload=body["id"], format="jsonl")
    rows = iter_rows(source, SourceContext(store=store, owner="local"))
    assert [r.text for r in rows] == [f"prompt {i}" for i in range(5)]

    big = upload(client, b"", presign="true").json()
    with httpx.Client() as plain:
        assert plain.put(big["upload_url"], content=JSONL * 100).status_code == 200  # S3 cannot stop it
    over = bulk(client, file_source(big["id"]))
    assert over.status_code == 422 and over.json()["setting"] == "QKVAULT_MAX_UPLOAD_BYTES"


def test_presigned_uploads_need_an_s3_store(client: TestClient) -> None:
    response = upload(client, b"", presign="true")
    assert response.status_code == 409 and response.json()["type"] == "presigned-urls-unavailable"
