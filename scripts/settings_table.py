"""The table of ``QKVAULT_*`` environment variables in docs/operations.md, from the settings classes.

    .venv/bin/python scripts/settings_table.py            # print the table
    .venv/bin/python scripts/settings_table.py --write    # rewrite it in docs/operations.md
    .venv/bin/python scripts/settings_table.py --check    # exit 1 when the doc's table is stale

The classes are each deployable's: api.settings.ApiSettings, worker.settings.WorkerSettings and
qkvault.settings.ClientSettings; their field descriptions are the table's text (storage/settings_doc.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "operations.md"
sys.path.insert(0, str(REPO))

import api.settings  # noqa: E402, F401  (each import registers its deployable's class)
import qkvault.settings  # noqa: E402, F401
import worker.settings  # noqa: E402, F401
from storage.settings_doc import deployables, generated_part, render_env_table, with_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite the table in {DOC.relative_to(REPO)}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the table there is not current")
    args = parser.parse_args()
    table = render_env_table(deployables())
    if not (args.write or args.check):
        print(table)
        return 0
    text = DOC.read_text(encoding="utf-8")
    if args.check:
        if generated_part(text) != table:
            print(f"{DOC.relative_to(REPO)}: the settings table is stale; run {Path(__file__).name} --write")
            return 1
        return 0
    DOC.write_text(with_table(text, table), encoding="utf-8")
    print(f"wrote the settings table of {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
