"""Settings of the client deployable: the Python client (:class:`qkvault.Client`) and the
``qkvault`` commands (``qkvault keys`` included), from ``QKVAULT_*``.

Read where the client or a command starts (``ClientSettings()``); an explicit argument (``Client(url,
api_key=...)``, ``--api``, ``--api-key``, ``--home``, ``--database-url``) wins over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, SecretStr

from storage.settings import DEFAULT_HOME, QkvaultSettings

DEFAULT_API_BASE_URL = "http://127.0.0.1:8000"


class ClientSettings(QkvaultSettings):
    """Client and CLI settings; every field is optional."""

    if TYPE_CHECKING:  # every field is optional (env or default); mypy cannot see Field(<positional default>)

        def __init__(self, **values: Any) -> None: ...

    deployable: ClassVar[str | None] = "client/CLI"

    api_base_url: str | None = Field(
        default=None,
        description="the API the client and the `qkvault` commands talk to (`--api` overrides; unset: a "
        f"stack started by `qkvault up` in `QKVAULT_HOME` for the commands, else `{DEFAULT_API_BASE_URL}`)",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="the key the client and the `qkvault` commands send (`--api-key` overrides; unset: the "
        "commands send the key of a stack started by `qkvault up` in `QKVAULT_HOME`, to that stack only)",
    )
    home: Path = Field(
        default=DEFAULT_HOME,
        description="directory of the embedded stack (`qkvault up`, `demo`): its SQLite index, store, "
        "logs, local API key and downloads (`--home` overrides)",
    )
    database_url: str | None = Field(
        default=None,
        description="`qkvault keys`: the index database it manages keys in (`--database-url` overrides; "
        "unset: `sqlite:///<QKVAULT_HOME>/index.db`, the embedded stack's)",
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="`qkvault up`, `demo`: the model cache handed to the embedded worker "
        "(unset: `<QKVAULT_HOME>/models`)",
    )

    def api_key_value(self) -> str | None:
        """The API key as text, or None when unset or blank."""
        key = self.api_key.get_secret_value().strip() if self.api_key is not None else ""
        return key or None

    def keys_database_url(self, home: Path | None = None) -> str:
        """``qkvault keys``' database: ``database_url``, else the embedded stack's index in ``home``
        (default :attr:`home`)."""
        if self.database_url:
            return self.database_url
        root = Path(home if home is not None else self.home).expanduser().resolve()
        return f"sqlite:///{root / 'index.db'}"
