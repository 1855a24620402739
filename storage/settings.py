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

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path(".qkvault")  # the embedded stack's directory (``qkvault up``), relative to the cwd
DEFAULT_QUEUE = "qkvault-export"


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

    @field_validator("model_cache_dir")
    @classmethod
    def _expand_user(cls, value: Path) -> Path:
        return value.expanduser()

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
