"""Package boundaries hold at run time: the API never loads torch; storage loads no torch/web/queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    loaded = _loaded_after(
        "import storage.bundle, storage.bundle.reader, storage.bundle.writer, storage.index, "
        "storage.modelinfo, storage.jobspec, storage.bundle.zipstream"
    )
    assert {"zarr", "xarray", "numpy"} <= loaded
    assert not {"torch", "transformers", "fastapi", "starlette", "celery"} & loaded


def test_worker_app_module_is_torch_free() -> None:
    loaded = _loaded_after("import worker.app")
    assert "celery" in loaded and "torch" not in loaded
