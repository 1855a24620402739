"""Run an export in-process (no Celery, no database) for worker tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import xarray as xr

from storage.bundle import open_bundle
from storage.bundle.writer import BundleWriter
from storage.jobs.spec import JobSpec
from worker.export import Exporter
from worker.models import LoadedModel, load_model

from .conftest import CollectingHooks, model_cache_dir

_LOADED: dict[tuple[str, str, str], LoadedModel] = {}


def loaded(spec: JobSpec, device: str = "cpu") -> LoadedModel:
    key = (spec.model.id, spec.model.dtype, device)
    if key not in _LOADED:
        _LOADED[key] = load_model(spec.model, device=torch.device(device), cache_dir=model_cache_dir())
    return _LOADED[key]


def export(
    spec: JobSpec | dict[str, Any], out: Path, device: str = "cpu", hooks: CollectingHooks | None = None
) -> tuple[xr.Dataset, CollectingHooks, LoadedModel]:
    spec = JobSpec.model_validate(spec)
    hooks = hooks or CollectingHooks()
    lm = loaded(spec, device)
    writer = BundleWriter(str(out), on_chunk=hooks.chunk_stored)
    Exporter(spec, lm, writer, hooks).run("test-job")
    return open_bundle(str(out)), hooks, lm
