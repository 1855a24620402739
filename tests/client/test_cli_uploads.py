"""``qkvault submit spec.json --prompts-file data.jsonl`` and ``Client.upload`` against the real API
under uvicorn: the file is uploaded (streamed), the job's source points at it, and what the worker
will read is the file's rows; mistakes are refused before anything is uploaded, and a bad file is
refused by the server naming the line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from qkvault.cli import main
from qkvault.client import Client
from storage.index import Index
from storage.index.apikeys import ApiKeys
from storage.sources.rows import SourceContext, iter_rows
from storage.sources.spec import FileSource
from storage.stores.objectstore import ObjectStore
from tests.api.support import SMOLLM2
from tests.services import qkvault_env, start_api

OWNER = "cli-up"


@pytest.fixture
def live_api(tmp_path: Path, redis_url: str) -> Iterator[tuple[str, str, Index, ObjectStore]]:
    """The API under uvicorn: (base URL, an API key, its index, its store)."""
    url = f"sqlite:///{tmp_path / 'index.db'}"
    index = Index(url)
    index.migrate()
    secret, _ = ApiKeys(index).create(owner=OWNER)
    queue = f"qkvault-up-test-{tmp_path.name}"
    store_dir = tmp_path / "store"
    env = qkvault_env(redis_url=redis_url, database_url=url, store_url=str(store_dir), queue_name=queue)
    try:
        with start_api(env, log_path=tmp_path / "api.log") as running:
            yield running.base_url, secret, index, ObjectStore(str(store_dir))
    finally:
        index.dispose()
        broker = redis.Redis.from_url(redis_url)
        broker.delete(queue)
        broker.close()


def write_spec(path: Path, **extra: object) -> Path:
    path.write_text(json.dumps({"model": {"id": SMOLLM2}, **extra}))
    return path


def uploads_of(store: ObjectStore) -> list[str]:
    return sorted({rel.split("/")[0] for rel, _ in store.list_files(f"{store.root_url}/uploads/{OWNER}")})


def test_submit_with_a_prompts_file(
    live_api: tuple[str, str, Index, ObjectStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_url, secret, index, store = live_api
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"prompt {i} " + "z" * 3000}) + "\n" for i in range(500)))
    spec = write_spec(tmp_path / "spec.json", source={"limit": 3, "shuffle_seed": 5})

    args = ["--api", base_url, "--api-key", secret, "submit", str(spec), "--prompts-file", str(data)]
    assert main([*args, "-q"]) == 0
    job_id = capsys.readouterr().out.strip()

    source = index.get_job(job_id).spec["source"]
    assert {k: source[k] for k in ("kind", "format", "limit", "shuffle_seed")} == {
        "kind": "file",
        "format": "jsonl",
        "limit": 3,
        "shuffle_seed": 5,
    }
    assert source.get("field") is None  # the default field, text
    assert uploads_of(store) == [source["upload"]]
    stored = store.read_bytes(store.upload_url(OWNER, source["upload"]), "data")
    assert stored == data.read_bytes() and len(stored) > 1 << 20  # over one request / piece
    rows = iter_rows(FileSource.model_validate(source), SourceContext(store=store, owner=OWNER))
    assert sorted(r.row for r in rows) == [0, 1, 2]  # what the worker will read

    assert main(args) == 0  # not quiet: the upload is reported on stderr
    assert f"uploaded {data}" in capsys.readouterr().err


def test_mistakes_are_refused_before_uploading(
    live_api: tuple[str, str, Index, ObjectStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_url, secret, _, store = live_api
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    odd = tmp_path / "prompts.csv"
    odd.write_text("one\n")
    inline = write_spec(tmp_path / "inline.json", prompts=["hi"])
    plain = write_spec(tmp_path / "plain.json")
    dataset = write_spec(tmp_path / "dataset.json", source={"kind": "dataset", "path": "x", "column": "t"})
    common = ["--api", base_url, "--api-key", secret, "submit"]
    cases = [
        ([str(inline), "--prompts-file", str(prompts)], "the spec has inline prompts"),
        ([str(dataset), "--prompts-file", str(prompts)], "source is of kind 'dataset'"),
        ([str(plain), "--prompts-file", str(odd)], "cannot tell the format of"),
        ([str(plain), "--prompts-file", str(prompts), "--field", "x"], "--field is for jsonl and parquet"),
        ([str(plain), "--field", "x"], "--format and --field describe --prompts-file"),
        ([str(plain), "--prompts-file", str(tmp_path / "missing.jsonl")], "cannot read"),
    ]
    for extra, message in cases:
        assert main([*common, *extra]) == 1, extra
        assert message in capsys.readouterr().err, extra
    assert uploads_of(store) == []

    assert main([*common, str(plain), "--prompts-file", str(odd), "--format", "text", "-q"]) == 0
    capsys.readouterr()


def test_a_bad_file_is_refused_naming_the_line(
    live_api: tuple[str, str, Index, ObjectStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base_url, secret, _, _ = live_api
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"body": "c"}\n')
    spec = write_spec(tmp_path / "spec.json")
    common = ["--api", base_url, "--api-key", secret, "submit", str(spec), "--prompts-file", str(data)]
    assert main([*common, "-q"]) == 1
    assert "has no field 'text' (its fields: 'prompt')" in capsys.readouterr().err
    assert main([*common, "--field", "prompt", "-q"]) == 1
    assert "line 3 (row 2) has no field 'prompt' (its fields: 'body')" in capsys.readouterr().err


def test_client_upload_of_a_parquet_file(
    live_api: tuple[str, str, Index, ObjectStore], tmp_path: Path
) -> None:
    base_url, secret, index, _ = live_api
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]]}), path)
    with Client(base_url, api_key=secret) as client:
        upload = client.upload(path)
        assert (upload["nbytes"], upload["sha256"]) == (
            path.stat().st_size,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        spec = {
            "model": {"id": SMOLLM2},
            "source": {"kind": "file", "upload": upload["id"], "format": "parquet", "field": "input_ids"},
        }
        job = client.submit(spec)
    assert index.get_job(job.id).spec["source"]["upload"] == upload["id"]
