"""``model.id`` cannot probe the file system (issue #12): an absolute path is admitted only under a
model root of the server (``QKVAULT_MODEL_ROOTS``); any other path, whether it exists, is a folder,
a file, a device, a symlink out of a root or a ``..`` escape, gets one and the same 422."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import ApiSettings
from storage.models.roots import outside_roots_message
from tests.api.support import TINY_CONFIG

ENDPOINTS = ["/v1/jobs", "/v1/jobs/estimate"]


def _model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """``root`` (the one model root) holding a model, symlinks out of it and a FIFO; a model folder
    ``outside`` it, beside it."""
    root = tmp_path / "roots" / "models"
    inside = _model_folder(root / "tiny")
    outside = _model_folder(tmp_path / "roots" / "outside")
    (root / "etc-link").symlink_to("/etc")
    (root / "passwd-link").symlink_to("/etc/passwd")
    (root / "outside-link").symlink_to(outside)
    os.mkfifo(root / "fifo.gguf")
    return {"root": root, "inside": inside, "outside": outside}


@pytest.fixture
def roots_client(
    api_settings: ApiSettings, auth_headers: dict[str, str], layout: dict[str, Path]
) -> Iterator[Callable[..., TestClient]]:
    """A client of an app whose model roots are ``roots`` (default: ``layout["root"]`` only)."""
    with ExitStack() as stack:

        def make(roots: list[Path] | None = None) -> TestClient:
            settings = api_settings.model_copy(update={"model_roots": roots or [layout["root"]]})
            app = create_app(settings)
            return stack.enter_context(TestClient(app, raise_server_exceptions=False, headers=auth_headers))

        yield make


def _refused(layout: dict[str, Path]) -> list[dict[str, str]]:
    root, outside = layout["root"], layout["outside"]
    models = [
        "/etc",
        "/etc/passwd",
        "/proc/self/environ",
        "/dev/zero.gguf",
        "/nonexistent/x",
        "/nonexistent/x.gguf",
        str(outside),  # a real model folder, outside the root
        f"{root}/../outside",  # a `..` escape to it
        f"{root}/tiny/../../outside",
        f"{root}/../../../../../../etc/passwd",
        f"{root}/etc-link",  # symlinks inside the root that point out of it
        f"{root}/etc-link/passwd",
        f"{root}/passwd-link",
        f"{root}/outside-link",
        f"{root}/fifo.gguf",  # a special file under the root
        f"{root}x/tiny",  # a sibling sharing the root's name as a prefix
        "//etc/passwd",
    ]
    specs = [{"id": model} for model in models]
    specs.append({"id": str(layout["inside"]), "gguf_file": "../../outside/config.json"})
    specs.append({"id": str(layout["inside"]), "gguf_file": "/etc/passwd"})
    return specs


def _shape(body: dict[str, Any], model_id: str) -> str:
    """The response body with the id replaced: what must not differ between refused paths."""
    return json.dumps(body, sort_keys=True).replace(json.dumps(repr(model_id))[1:-1], "<id>")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_paths_outside_the_model_roots_get_one_and_the_same_422(
    roots_client: Callable[..., TestClient],
    layout: dict[str, Path],
    endpoint: str,
    broker: redis.Redis,
    queue_name: str,
) -> None:
    client = roots_client()
    shapes = set()
    for model in _refused(layout):
        response = client.post(endpoint, json={"model": model, "prompts": ["hi"]})
        assert response.status_code == 422, (model, response.text)
        body = response.json()
        assert body["type"] == "invalid-job-spec", body
        assert body["detail"] == outside_roots_message(model["id"])
        assert body["errors"] == [{"loc": "body.model.id", "msg": body["detail"], "type": "invalid-job-spec"}]
        shapes.add(_shape(body, model["id"]))
    assert len(shapes) == 1, shapes
    detail = json.loads(shapes.pop())["detail"]
    assert "QKVAULT_MODEL_ROOTS" in detail and str(layout["root"]) not in detail  # roots stay private
    assert broker.llen(queue_name) == 0 and client.get("/v1/jobs").json()["items"] == []


def test_a_model_folder_under_a_root_is_admitted_and_read(
    roots_client: Callable[..., TestClient], layout: dict[str, Path]
) -> None:
    client = roots_client()
    for model_id in (str(layout["inside"]), f"{layout['root']}/./tiny/", f"{layout['root']}//tiny"):
        spec = {"model": {"id": model_id}, "prompts": ["hi"]}
        for endpoint in ("/v1/jobs/estimate", "/v1/jobs?dry_run=true"):
            response = client.post(endpoint, json=spec)
            assert response.status_code == 200, response.text
            assert response.json()["raw_bytes"] > 0  # its config was read: the estimate exists
        assert client.post("/v1/jobs", json=spec).status_code == 202


def test_a_root_reached_through_a_symlink_and_several_roots(
    roots_client: Callable[..., TestClient], layout: dict[str, Path], tmp_path: Path
) -> None:
    """A root is compared by its real path too: a root that is itself a symlink works."""
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(layout["root"])
    client = roots_client([tmp_path / "elsewhere", linked_root])
    spec = {"model": {"id": str(linked_root / "tiny")}, "prompts": ["hi"]}
    assert client.post("/v1/jobs/estimate", json=spec).status_code == 200
    spec = {"model": {"id": str(layout["inside"])}, "prompts": ["hi"]}  # not under a configured root
    response = client.post("/v1/jobs/estimate", json=spec)
    assert response.status_code == 422 and response.json()["detail"] == outside_roots_message(
        str(layout["inside"])
    )


def test_hub_and_pkg_ids_are_not_paths(roots_client: Callable[..., TestClient]) -> None:
    client = roots_client()
    hub = client.post("/v1/jobs", json={"model": {"id": "qkvault-test-org/not-cached"}, "prompts": ["hi"]})
    assert hub.status_code == 202, hub.text
    pkg = client.post("/v1/jobs", json={"model": {"id": "pkg:no_such_package_qk/x.gguf"}, "prompts": ["h"]})
    assert pkg.status_code == 422 and "is not installed on this server" in pkg.json()["detail"]
