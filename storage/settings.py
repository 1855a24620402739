"""The settings classes' common ground (environment prefix ``QKVAULT_``).

One pydantic-settings class per deployable reads the environment: :class:`api.settings.ApiSettings`
(the API), :class:`worker.settings.WorkerSettings` (the worker and the reconciler) and
:class:`qkvault.settings.ClientSettings` (the Python client and the ``qkvault`` commands). The
first two share :class:`ServiceSettings` (the index, the store, the broker); all three derive from
:class:`QkvaultSettings`. Each is constructed once per process by its entry point and passed in;
nothing reads the environment at import time and nothing else reads ``QKVAULT_*`` by hand.

The field descriptions are the documentation: docs/operations.md's table of environment variables
is generated from them (``python scripts/settings_table.py --write``; a test fails when it drifts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_HOME = Path(".qkvault")  # the embedded stack's directory (``qkvault up``), relative to the cwd
DEFAULT_QUEUE = "qkvault-export"


def list_setting(value: Any) -> Any:
    """A list setting's variable: comma-separated (``a,b``) or a JSON list (``["a", "b"]``, for
    items holding commas); a field declares ``Annotated[list[...], NoDecode]`` and runs this
    ``mode="before"``."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def huggingface_hub_cache() -> Path:
    """This process's Hugging Face hub cache, as huggingface_hub finds it: ``HF_HUB_CACHE``, else
    ``HF_HOME``/hub, else ``~/.cache/huggingface/hub`` (read without huggingface_hub when it is
    not installed)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
        if cache:
            return Path(cache).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
        return Path(home, "hub").expanduser()
    return Path(constants.HF_HUB_CACHE).expanduser()


class QkvaultSettings(BaseSettings):
    """Base of every qkvault settings class: field ``name`` comes from ``QKVAULT_<NAME>``; an empty
    variable counts as unset."""

    model_config = SettingsConfigDict(env_prefix="QKVAULT_", extra="ignore", env_ignore_empty=True)

    # Set by each deployable's class (its label in the table of environment variables).
    deployable: ClassVar[str | None] = None

    @classmethod
    def env_var(cls, field: str) -> str:
        """The environment variable of ``field`` (``database_url`` -> ``QKVAULT_DATABASE_URL``)."""
        if field not in cls.model_fields:
            raise KeyError(f"{cls.__name__} has no field {field!r}")
        return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


class ServiceSettings(QkvaultSettings):
    """What the API and the worker share: the SQL index, the object store, the broker and the queue,
    the model cache."""

    database_url: str = Field(
        f"sqlite:///{DEFAULT_HOME / 'index.db'}",
        description="SQL index: `sqlite:///path` (WAL, busy timeout) or "
        "`postgresql+psycopg://user:pw@host/db`; also read by `alembic -c storage/index/alembic.ini`",
    )
    # Database faults (docs/reliability.md): one index transaction is retried with backoff this long
    db_retry_s: float = Field(
        120.0,
        gt=0,
        description="retry budget of one index transaction after a transient database error (locked, "
        "busy, connection lost, read-only after a fault, a PostgreSQL restart or failover); then the "
        "worker gives the job back. As long as the default lease, so a job survives an outage shorter "
        "than `QKVAULT_LEASE_TIMEOUT_S` (docs/reliability.md)",
    )
    store_url: str = Field(
        str(DEFAULT_HOME / "store"),
        description="bundle store root: a path, `file:///abs/path` or `s3://bucket/prefix` "
        "(any S3-compatible server)",
    )
    s3_endpoint_url: str | None = Field(
        None, description="s3fs endpoint of `s3://` stores (e.g. `http://seaweedfs:8333`)"
    )
    s3_access_key_id: str | None = Field(None, description="s3fs access key of `s3://` stores")
    s3_secret_access_key: SecretStr | None = Field(None, description="s3fs secret key of `s3://` stores")
    s3_region: str | None = Field(None, description="s3fs region of `s3://` stores")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker and result backend")
    task_soft_time_limit_s: int = Field(
        6 * 3600,
        gt=0,
        description="Celery soft time limit of one job (seconds); soft < hard < broker visibility timeout "
        "is enforced at start: a job must end before Redis redelivers it",
    )
    task_hard_time_limit_s: int = Field(
        6 * 3600 + 300, gt=0, description="Celery hard time limit of one job (seconds)"
    )
    broker_visibility_timeout_s: int = Field(
        7 * 3600,
        gt=0,
        description="Redis visibility timeout (seconds): an unacknowledged job is redelivered after it",
    )
    queue_name: str = Field(
        DEFAULT_QUEUE, description="Celery queue the API sends to and the worker consumes"
    )
    model_cache_dir: Path = Field(
        Path("~/.cache/qkvault/models"),
        validate_default=True,
        description="dequantised GGUF cache (safetensors): the worker writes it, the API reads `pkg:` "
        "models' tokenizers from it at admission",
    )
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="model roots: the folders an absolute `model.id` must lie under, symlinks resolved "
        "(comma-separated or a JSON list of absolute paths); any other path is refused with one and "
        "the same 422, on the API and again on the worker. Empty: the model cache "
        "(`QKVAULT_MODEL_CACHE_DIR`) and the process's Hugging Face hub cache (`HF_HUB_CACHE`; on the "
        'API also `QKVAULT_HUB_CACHE_DIR`). See "Model roots" below',
    )

    datasets_dir: Path | None = Field(
        None,
        description="local Hugging Face datasets of bulk jobs' `dataset` sources (docs/bulk-jobs.md): "
        "`source.path` is a folder under it (`org/name`, as `hf download --repo-type dataset org/name "
        "--local-dir <dir>/org/name` makes it), a dataset in its hub-cache layout "
        "(`datasets--org--name`), or an absolute path inside it; nothing is downloaded. Unset: the "
        "process's Hugging Face hub cache (`HF_HUB_CACHE`). The API samples a dataset it can read here "
        "at submission, else the worker checks it",
    )

    # The size of one bulk job: checked at submission on a sample of the source, and by the worker.
    max_sequences: int = Field(
        default=1_000_000,
        ge=1,
        description="sequences of one bulk job, whatever its source: counted for inline sources and "
        "Parquet files, estimated from a sample of other files and of datasets (docs/bulk-jobs.md, "
        '"Limits"); more get 422 naming the limit, and the worker fails a job that reads more '
        "(keeping its finished micro-batches)",
    )
    max_job_tokens: int = Field(
        default=500_000_000,
        ge=1,
        description="prompt tokens + `max_new_tokens` over every sequence of one bulk job, estimated "
        "from a sample of its source; more get 422 naming the limit, and the worker fails a job that "
        "reads more (keeping its finished micro-batches)",
    )

    @field_validator("model_cache_dir", "datasets_dir")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("model_roots", mode="before")
    @classmethod
    def _root_list(cls, value: Any) -> Any:
        return list_setting(value)

    @field_validator("model_roots")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        roots = [root.expanduser() for root in value]
        for root in roots:
            if not root.is_absolute():
                raise ValueError(f"model root {str(root)!r} is not an absolute path: give the full path")
        return [Path(os.path.normpath(root)) for root in roots]

    def model_root_dirs(self) -> tuple[Path, ...]:
        """The model roots in force: ``model_roots``, else :meth:`default_model_roots`."""
        return tuple(self.model_roots) or self.default_model_roots()

    def default_model_roots(self) -> tuple[Path, ...]:
        """The model roots when ``model_roots`` is empty: the model cache and the Hugging Face hub
        cache of this process."""
        return (self.model_cache_dir, huggingface_hub_cache())

    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs options for ``s3://`` store URLs (empty for local stores)."""
        opts: dict[str, object] = {}
        if self.s3_endpoint_url:
            opts["endpoint_url"] = self.s3_endpoint_url
        if self.s3_access_key_id:
            opts["key"] = self.s3_access_key_id
        if self.s3_secret_access_key:
            opts["secret"] = self.s3_secret_access_key.get_secret_value()
        if self.s3_region:
            opts["client_kwargs"] = {"region_name": self.s3_region}
        return opts
