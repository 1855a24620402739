"""What every ``qkvault`` command shares: messages, settings, the home folder, the API to talk to."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qkvault.client import Client
    from qkvault.settings import ClientSettings


def err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def settings() -> ClientSettings:
    """The client's ``QKVAULT_*`` settings (the command-line options win over them)."""
    from qkvault.settings import ClientSettings

    return ClientSettings()


def home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else settings().home


def api_target(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(URL, API key): --api, else $QKVAULT_API_BASE_URL, else a stack started by `qkvault up` in
    --home (with its local key), else the default. The key: --api-key, else $QKVAULT_API_KEY (read
    by the client), else that stack's key; a stack's key never goes to another server."""
    key = getattr(args, "api_key", None)
    if getattr(args, "api", None):
        return str(args.api), key
    found = settings()
    if found.api_base_url:
        return None, key  # the client reads it
    from qkvault.embedded import local_api_key, running_stack

    state = running_stack(home(args))
    if not state:
        return None, key
    return str(state["base_url"]), key or found.api_key_value() or local_api_key(home(args))


def api_client(args: argparse.Namespace) -> Client:
    from qkvault.client import Client

    url, key = api_target(args)
    return Client(url, timeout_s=args.http_timeout, api_key=key)
