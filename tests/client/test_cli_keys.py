"""``qkvault keys create|list|revoke`` against a real index, and the key used by the client and CLI.

The API runs in-process (FastAPI TestClient for the key checks, uvicorn for the CLI's HTTP calls).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from qkvault.cli import main
from qkvault.client import Client
from qkvault.errors import QkvaultClientError
from storage.index import Index
from tests.services import qkvault_env, start_api


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def api(sqlite_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = ApiSettings(database_url=sqlite_url, store_url=str(tmp_path / "store"))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_create_list_revoke(capsys: pytest.CaptureFixture[str], sqlite_url: str, api: TestClient) -> None:
    db = ["--database-url", sqlite_url]
    code, out, err = _run(capsys, "keys", "create", "--owner", "alice", "--label", "alice laptop", *db)
    assert code == 0
    secret = out.strip()
    assert out.count("\n") == 1 and secret.startswith("qk_")  # stdout: the secret alone, once
    assert "for owner 'alice' (role user" in err and "shown this once" in err and secret not in err
    code, out, _ = _run(capsys, "keys", "create", "--owner", "root", "--admin", *db)
    admin = out.strip()

    code, listing, _ = _run(capsys, "keys", "list", *db)
    assert code == 0 and secret not in listing and admin not in listing
    lines = listing.splitlines()
    assert lines[0].split()[:4] == ["ID", "OWNER", "ROLE", "PREFIX"]
    alice_row = next(line for line in lines if " alice " in line)
    key_id = alice_row.split()[0]
    assert "alice laptop" in alice_row and f"{secret[:12]}..." in alice_row
    assert any(" root " in line and " admin " in line for line in lines)

    # the key works against the API, the admin key sees everything
    bearer = {"Authorization": f"Bearer {secret}"}
    assert api.get("/v1/jobs", headers=bearer).status_code == 200
    assert api.get("/v1/jobs", headers={"Authorization": f"Bearer {admin}"}).status_code == 200

    code, out, _ = _run(capsys, "keys", "revoke", key_id, *db)
    assert code == 0 and f"revoked API key {key_id}" in out
    assert api.get("/v1/jobs", headers=bearer).status_code == 401
    _, listing, _ = _run(capsys, "keys", "list", *db)
    assert key_id not in listing
    _, listing, _ = _run(capsys, "keys", "list", "--all", "--owner", "alice", *db)
    assert key_id in listing and "root" not in listing

    code, _, err = _run(capsys, "keys", "revoke", "nope", *db)
    assert code == 1 and "API key nope not found" in err

    # only hashes in the database
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT key_hash FROM api_keys")).scalars().all()
    engine.dispose()
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    assert secret not in str(stored)


def test_database_url_comes_from_env_or_home(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QKVAULT_DATABASE_URL", raising=False)
    code, _, _ = _run(capsys, "keys", "create", "--owner", "h", "--home", str(tmp_path / "home"))
    assert code == 0 and (tmp_path / "home" / "index.db").exists()
    monkeypatch.setenv("QKVAULT_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert _run(capsys, "keys", "create", "--owner", "e")[0] == 0
    _, listing, _ = _run(capsys, "keys", "list")
    assert " e " in listing and " h " not in listing


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys"]) == 2
    assert "create" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["keys", "create"])  # --owner is required


@pytest.fixture
def live_api(tmp_path: Path, redis_url: str) -> Iterator[tuple[str, str]]:
    """The API under uvicorn with one key of owner ``cli``: (base URL, secret)."""
    from storage.index.apikeys import ApiKeys

    url = f"sqlite:///{tmp_path / 'index.db'}"
    index = Index(url)
    index.migrate()
    secret, _ = ApiKeys(index).create(owner="cli")
    index.dispose()
    env = qkvault_env(redis_url=redis_url, database_url=url, store_url=str(tmp_path / "store"))
    with start_api(env, log_path=tmp_path / "api.log") as running:
        yield running.base_url, secret


def test_client_and_cli_send_the_key(
    live_api: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, secret = live_api
    monkeypatch.delenv("QKVAULT_API_KEY", raising=False)
    with Client(base_url) as anonymous, pytest.raises(QkvaultClientError) as info:
        anonymous.list()
    assert info.value.status == 401 and "sent no API key" in str(info.value)
    with Client(base_url, api_key="qk_" + "z" * 43) as wrong, pytest.raises(QkvaultClientError) as info:
        wrong.list()
    assert (
        info.value.status == 401
        and "not valid" in str(info.value)
        and "sent no API key" not in str(info.value)
    )
    with Client(base_url, api_key=secret) as client:
        assert list(client.list()) == []
    assert "qk_" not in repr(Client(base_url, api_key=secret))

    assert main(["list", "--api", base_url, "--api-key", secret]) == 0
    capsys.readouterr()
    monkeypatch.setenv("QKVAULT_API_KEY", secret)
    assert main(["list", "--api", base_url]) == 0
    with Client(base_url) as from_env:
        assert from_env.has_api_key and list(from_env.list()) == []
    monkeypatch.delenv("QKVAULT_API_KEY")
    assert main(["list", "--api", base_url]) == 1
    assert "401" in capsys.readouterr().err


def test_commands_use_the_embedded_stacks_key_only_for_that_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import os

    from qkvault.cli import build_parser
    from qkvault.cli_common import api_target
    from qkvault.embedded import API_KEY_FILE, STATE_FILE

    monkeypatch.delenv("QKVAULT_API_KEY", raising=False)
    monkeypatch.delenv("QKVAULT_API_BASE_URL", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    (home / API_KEY_FILE).write_text("qk_local\n")
    (home / STATE_FILE).write_text(json.dumps({"base_url": "http://127.0.0.1:9", "pid": os.getpid()}))
    parse = build_parser().parse_args

    assert api_target(parse(["list", "--home", str(home)])) == ("http://127.0.0.1:9", "qk_local")
    assert api_target(parse(["list", "--home", str(home), "--api-key", "qk_mine"]))[1] == "qk_mine"
    # another server never receives the local key
    assert api_target(parse(["list", "--home", str(home), "--api", "http://other:8000"])) == (
        "http://other:8000",
        None,
    )
    monkeypatch.setenv("QKVAULT_API_BASE_URL", "http://other:8000")
    assert api_target(parse(["list", "--home", str(home)])) == (None, None)
