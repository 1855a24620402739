"""Package boundaries hold at run time: the API never loads torch; storage loads no torch/web/queue;
the client and CLI load neither torch nor the API or worker packages.

The import directions themselves, imports inside functions included, are checked statically by
``lint-imports`` (contracts in pyproject.toml's ``[tool.importlinter]``, docs/architecture.md); these
tests prove what a process really loads, which the static graph cannot (lazy ``importlib`` imports,
what third-party packages import in turn).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Every module of the package but ``__main__`` (it runs the CLI); walk_packages imports packages to
# find their children; the alembic migration scripts (no __init__.py) are not modules of the package.
_IMPORT_ALL = (
    "import importlib, pkgutil, {pkg}\n"
    "for info in pkgutil.walk_packages({pkg}.__path__, '{pkg}.'):\n"
    "    if not info.name.endswith('.__main__'):\n"
    "        importlib.import_module(info.name)\n"
)


def _loaded_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_api_process_never_imports_torch(tmp_path: Path) -> None:
    loaded = _loaded_after(
        "from api.app import create_app\nfrom api.settings import ApiSettings\n"
        f"create_app(ApiSettings(database_url='sqlite:///{tmp_path}/i.db', store_url='{tmp_path}'))"
    )
    assert "fastapi" in loaded
    assert not {"torch", "transformers"} & loaded


def test_storage_reader_needs_only_numpy_zarr_xarray() -> None:
    loaded = _loaded_after(_IMPORT_ALL.format(pkg="storage"))
    assert {"zarr", "xarray", "numpy"} <= loaded
    forbidden = {"torch", "transformers", "fastapi", "starlette", "celery", "api", "worker", "qkvault"}
    assert not forbidden & loaded


def test_client_and_cli_load_no_torch_api_or_worker() -> None:
    loaded = _loaded_after(_IMPORT_ALL.format(pkg="qkvault"))
    assert "httpx" in loaded
    assert not {"torch", "transformers", "fastapi", "celery", "api", "worker"} & loaded


def test_worker_app_module_is_torch_free() -> None:
    loaded = _loaded_after("import worker.app")
    assert "celery" in loaded and "torch" not in loaded
