"""Which absolute paths a job's ``model.id`` may name: only those under a model root of the server
(``QKVAULT_MODEL_ROOTS``; docs/operations.md, "Model roots").

The API checks this at admission and the worker again before it loads a model (a job stored before
the rule, or admitted by a misconfigured API). An absolute path is admitted when

1. it has no ``..`` component and, normalised without touching the file system
   (:func:`os.path.normpath`), lies under a root (or is one);
2. with every symlink resolved (:func:`os.path.realpath`), it still lies under a root's own real path
   (a symlink in a root that points at ``/etc`` does not pass);
3. it is a regular file or a folder, if it exists (no device, FIFO or socket).

The same holds for the GGUF file a folder names (``model.gguf_file``). Every refusal is one and the
same :class:`~storage.errors.InvalidJobSpec` (422) whose text depends only on the id: whether the
path exists, is readable or is special is never told, so ``model.id`` cannot probe the file system.
The message names the setting, not the roots: operators' paths stay private. ``pkg:`` and hub ids
are not paths and are not checked here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from storage.errors import InvalidJobSpec
from storage.models.spec import ModelSpec

ROOTS_SETTING = "QKVAULT_MODEL_ROOTS"


def outside_roots_message(model_id: str) -> str:
    """The one message of every refused path (it depends on ``model_id`` only)."""
    return (
        f"model.id {model_id!r} is not a model folder or file under a model root of this server "
        f"({ROOTS_SETTING}); use a model under one of its model roots, a hub id or a pkg: id, or ask "
        f"the operator to add the model's folder to {ROOTS_SETTING}"
    )


def outside_roots(model_id: str) -> InvalidJobSpec:
    """The error of every refused path: 422 ``invalid-job-spec`` on ``body.model.id``."""
    return InvalidJobSpec(outside_roots_message(model_id), detail={"field": "model.id"})


def _within(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def model_paths(model: ModelSpec) -> list[str]:
    """The paths loading ``model`` reads, as given (empty for ``pkg:`` and hub ids): the id, and the
    GGUF file inside a folder id (``gguf_file``)."""
    ident = model.id
    if not ident.startswith("/"):
        return []
    paths = [ident]
    if model.gguf_file and not ident.endswith(".gguf"):
        paths.append(os.path.join(ident, model.gguf_file))
    return paths


def check_model_roots(model: ModelSpec, roots: Sequence[Path]) -> None:
    """Raise the one :func:`outside_roots` error unless every path of ``model`` (:func:`model_paths`)
    lies under one of ``roots`` (module docstring); ``pkg:`` and hub ids pass untouched."""
    paths = model_paths(model)
    if not paths:
        return
    lexical_roots = [os.path.abspath(root) for root in roots]
    for path in paths:
        if ".." in path.split("/") or not _within(os.path.normpath(path), lexical_roots):
            raise outside_roots(model.id)
    real_roots = [os.path.realpath(root) for root in lexical_roots]
    for path in paths:
        real = os.path.realpath(path)
        if not _within(real, real_roots):
            raise outside_roots(model.id)
        try:
            mode = os.stat(real).st_mode
        except OSError:
            continue  # missing under a root: the readers say what is missing
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise outside_roots(model.id)
