"""The page's files ship in the wheel: every file of api/ui/ matches the package-data globs of
pyproject.toml (a new kind of file there without a glob would be missing from an installed API)."""

from __future__ import annotations

import fnmatch
import tomllib

from tests.services import REPO_ROOT


def test_every_page_file_is_package_data() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["api.ui"]
    files = [p.name for p in (REPO_ROOT / "api" / "ui").iterdir() if p.is_file() and p.suffix != ".py"]
    assert {"index.html", "app.js", "style.css"} <= set(files)
    missing = [name for name in files if not any(fnmatch.fnmatch(name, g) for g in globs)]
    assert not missing, f"add globs for {missing} to [tool.setuptools.package-data] api.ui"
