"""``python -m storage.index.migrate`` (the compose file's ``migrate`` service and the embedded
stack's first step) really migrates: before, the module had no entry point and exited 0 doing
nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from storage.index import Index
from storage.index.apikeys import ApiKeys
from storage.index.migrate import current_revision


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "storage.index.migrate", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_migrates_the_database_of_the_environment_and_keeps_a_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/index.db"
    done = _run(env={"QKVAULT_DATABASE_URL": url})
    assert done.returncode == 0, done.stderr
    index = Index(url)
    revision = current_revision(index.engine)
    assert revision is not None and f"index at {revision}" in done.stdout
    key_file = tmp_path / "key"
    assert _run("--database-url", url, "--api-key-file", str(key_file), "--owner", "me").returncode == 0
    secret = key_file.read_text().strip()
    principal = ApiKeys(index).authenticate(secret)
    assert principal is not None and principal.owner == "me"
    assert _run("--database-url", url, "--api-key-file", str(key_file), "--owner", "me").returncode == 0
    assert key_file.read_text().strip() == secret  # a valid key is reused
    index.dispose()
