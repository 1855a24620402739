"""The table of ``QKVAULT_*`` environment variables, generated from the settings classes.

Each deployable's class (a :class:`storage.settings.QkvaultSettings` subclass that sets
``deployable``) contributes its fields; a field several deployables share (declared once, in a
common base) is one row naming them all. The table lives in docs/operations.md between
:data:`BEGIN` and :data:`END`; ``python scripts/settings_table.py --write`` regenerates it and
tests/test_settings.py fails when it drifts. This module imports no deployable: the caller imports
``api.settings``, ``worker.settings`` and ``qkvault.settings`` first (see :func:`deployables`).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from storage.settings import QkvaultSettings

BEGIN = (
    "<!-- BEGIN settings table: generated from the settings classes' field descriptions by "
    "`python scripts/settings_table.py --write`; do not edit by hand -->"
)
END = "<!-- END settings table -->"


@dataclass(frozen=True)
class EnvVar:
    name: str
    default: str
    description: str
    read_by: tuple[str, ...]


def deployables() -> list[type[QkvaultSettings]]:
    """Every imported settings class that names its deployable, in import order."""
    found: list[type[QkvaultSettings]] = []
    pending: list[type[QkvaultSettings]] = [QkvaultSettings]
    while pending:
        cls = pending.pop(0)
        if cls.__dict__.get("deployable") and cls not in found:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value: Any = info.get_default(call_default_factory=True, validated_data={})
    if value is None or isinstance(value, SecretStr):
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list | tuple) and not value:
        return "empty"
    if isinstance(value, PurePath):
        value = value.as_posix()
    return f"`{value}`"


def env_rows(classes: Iterable[type[QkvaultSettings]]) -> list[EnvVar]:
    """One row per (variable, field declaration): the fields several deployables share first, then
    each deployable's own (deployables by label, fields in declaration order). A field missing a
    description is an error."""
    rows: dict[tuple[str, str, str], list[str]] = {}
    for cls in sorted(classes, key=lambda c: (c.deployable or c.__name__).lower()):
        label = cls.deployable or cls.__name__
        for name, info in cls.model_fields.items():
            if not info.description:
                raise ValueError(f"{cls.__name__}.{name} has no description: it is the documentation")
            key = (cls.env_var(name), _default_text(info), " ".join(info.description.split()))
            rows.setdefault(key, []).append(label)
    found = [EnvVar(name, default, text, tuple(read_by)) for (name, default, text), read_by in rows.items()]
    return sorted(found, key=lambda row: -len(row.read_by))  # stable: the order above within a group


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_env_table(classes: Sequence[type[QkvaultSettings]]) -> str:
    """The markdown table (no trailing newline)."""
    lines = ["| variable | default | read by | meaning |", "|---|---|---|---|"]
    for row in env_rows(classes):
        cells = (f"`{row.name}`", row.default, ", ".join(row.read_by), row.description)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def generated_part(document: str, *, begin: str = BEGIN, end: str = END) -> str:
    """The text between the markers of ``document`` (stripped; other generated tables pass theirs)."""
    start, stop = document.find(begin), document.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the document lacks the markers {begin!r} ... {end!r}")
    return document[start + len(begin) : stop].strip()


def with_table(document: str, table: str, *, begin: str = BEGIN, end: str = END) -> str:
    """``document`` with the text between its markers replaced by ``table``."""
    generated_part(document, begin=begin, end=end)  # the markers are there
    head, rest = document.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def generated_table_main(
    description: str, *, doc: Path, what: str, table: str, begin: str = BEGIN, end: str = END
) -> int:
    """The command line of a script that keeps a generated table of ``doc`` current: print it,
    ``--write`` it between the markers, or ``--check`` it (exit 1 when the document's is stale)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite the table in {doc.name}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the table there is not current")
    args = parser.parse_args()
    if not (args.write or args.check):
        print(table)
        return 0
    text = doc.read_text(encoding="utf-8")
    if args.check:
        if generated_part(text, begin=begin, end=end) != table:
            print(f"{doc}: the {what} is stale; run {Path(sys.argv[0]).name} --write")
            return 1
        return 0
    doc.write_text(with_table(text, table, begin=begin, end=end), encoding="utf-8")
    print(f"wrote the {what} of {doc}")
    return 0
