"""qkvault: the user-facing client and CLI.

    from qkvault import Client
    job = Client("http://127.0.0.1:8000").submit(spec)

    from qkvault import open_bundle, sequence_view     # a notebook: read a bundle, one sequence
    import qkvault.plot as qkplot                       # heatmap, attention_to_token, head_grid

Names are imported on first use, so ``import qkvault`` stays cheap (no xarray, zarr or httpx).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkvault.bundlefile import open_dataset
    from qkvault.client import Client
    from qkvault.embedded import EmbeddedStack, EmbeddedStackError
    from qkvault.errors import JobFailed, QkvaultClientError, WaitTimeout
    from qkvault.job import Job, JobPage, Progress
    from qkvault.show import describe_bundle
    from storage.bundle.bulk import open_bulk
    from storage.bundle.reader import open_bundle, open_summary
    from storage.bundle.trim import sequence_view

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "qkvault.client",
    "open_dataset": "qkvault.bundlefile",
    "EmbeddedStack": "qkvault.embedded",
    "EmbeddedStackError": "qkvault.embedded",
    "JobFailed": "qkvault.errors",
    "QkvaultClientError": "qkvault.errors",
    "WaitTimeout": "qkvault.errors",
    "Job": "qkvault.job",
    "JobPage": "qkvault.job",
    "Progress": "qkvault.job",
    "describe_bundle": "qkvault.show",
    # reading bundles in a notebook (numpy + zarr + xarray; pictures: qkvault.plot)
    "open_bundle": "storage.bundle.reader",
    "open_summary": "storage.bundle.reader",
    "open_bulk": "storage.bundle.bulk",
    "sequence_view": "storage.bundle.trim",
}

__all__ = [
    "Client",
    "EmbeddedStack",
    "EmbeddedStackError",
    "Job",
    "JobFailed",
    "JobPage",
    "Progress",
    "QkvaultClientError",
    "WaitTimeout",
    "__version__",
    "describe_bundle",
    "open_bulk",
    "open_bundle",
    "open_dataset",
    "open_summary",
    "sequence_view",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qkvault' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
