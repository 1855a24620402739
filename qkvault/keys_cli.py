"""``qkvault keys create|list|revoke``: API keys, managed straight in the index database.

An administrator's tool: it needs the database (``--database-url``, else ``$QKVAULT_DATABASE_URL``,
else the embedded stack's ``<home>/index.db``), not the API. The secret of a new key is printed
once, alone on standard output (``KEY=$(qkvault keys create --owner alice)``); the database keeps
only its sha256.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.index.apikeys import ApiKeys


def _database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return str(args.database_url)
    from qkvault.settings import ClientSettings

    return ClientSettings().keys_database_url(Path(args.home) if args.home else None)


def _keys(args: argparse.Namespace) -> ApiKeys:
    from storage.index import Index
    from storage.index.apikeys import ApiKeys

    index = Index(_database_url(args))
    index.migrate()  # a no-op when the schema is current
    return ApiKeys(index)


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_keys_create(args: argparse.Namespace) -> int:
    keys = _keys(args)
    try:
        secret, record = keys.create(owner=args.owner, admin=args.admin, label=args.label)
    finally:
        keys.index.dispose()
    _err(
        f"created API key {record.id} for owner {record.owner!r} (role {record.role}"
        f"{', label ' + repr(record.label) if record.label else ''}).\n"
        "The secret below is shown this once and stored nowhere: hand it to its user now "
        "(they set QKVAULT_API_KEY=... or pass --api-key)."
    )
    print(secret, flush=True)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = _keys(args)
    try:
        records = keys.list(owner=args.owner, include_revoked=args.all)
    finally:
        keys.index.dispose()
    rows = [("ID", "OWNER", "ROLE", "PREFIX", "CREATED", "REVOKED", "LABEL")]
    for r in records:
        revoked = r.revoked_at.strftime("%Y-%m-%d %H:%M") if r.revoked_at else "-"
        rows.append(
            (
                r.id,
                r.owner,
                r.role,
                r.prefix + "...",
                r.created_at.strftime("%Y-%m-%d %H:%M"),
                revoked,
                r.label or "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), flush=True)
    if not records:
        _err("no keys" + ("" if args.all else " (revoked keys are shown with --all)"))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from storage.index.apikeys import ApiKeyNotFound

    keys = _keys(args)
    try:
        record = keys.revoke(args.key_id)
    except ApiKeyNotFound as exc:
        _err(f"error: {exc.message}")
        return 1
    finally:
        keys.index.dispose()
    print(f"revoked API key {record.id} of owner {record.owner!r}: requests with it now get 401", flush=True)
    return 0


def add_keys_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``keys`` and its subcommands on the ``qkvault`` subparsers ``sub``."""
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument(
        "--database-url",
        metavar="URL",
        default=None,
        help="index database (default: $QKVAULT_DATABASE_URL, else <home>/index.db of the embedded stack)",
    )
    keys = sub.add_parser(
        "keys",
        help="manage API keys (admin; talks to the index database directly)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys.set_defaults(func=lambda _args: keys.print_help(sys.stderr) or 2)
    keys_sub = keys.add_subparsers(title="keys commands", metavar="COMMAND")

    p = keys_sub.add_parser("create", parents=[common, db], help="create a key and print its secret once")
    p.add_argument("--owner", required=True, help="user the key acts as (owner of the jobs it submits)")
    p.add_argument("--admin", action="store_true", help="admin role: sees and cancels every owner's jobs")
    p.add_argument("--label", default=None, help="free text to recognise the key (e.g. 'alice laptop')")
    p.set_defaults(func=cmd_keys_create)

    p = keys_sub.add_parser("list", parents=[common, db], help="list keys (never their secrets)")
    p.add_argument("--owner", default=None, help="only this owner's keys")
    p.add_argument("--all", action="store_true", help="include revoked keys")
    p.set_defaults(func=cmd_keys_list)

    p = keys_sub.add_parser("revoke", parents=[common, db], help="revoke a key: it stops working at once")
    p.add_argument("key_id", metavar="KEY_ID", help="id shown by `qkvault keys list`")
    p.set_defaults(func=cmd_keys_revoke)
