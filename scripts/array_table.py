"""The array table of docs/bundle-format.md, from the array declarations (storage/bundle/arrays.py).

    .venv/bin/python scripts/array_table.py            # print the table
    .venv/bin/python scripts/array_table.py --write    # rewrite it in docs/bundle-format.md
    .venv/bin/python scripts/array_table.py --check    # exit 1 when the doc's table is stale

Each row is one ``ArraySpec`` of ``storage.bundle.arrays.ARRAYS`` (storage/jobs/arrays_doc.py
renders it): edit the declaration, not the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bundle-format.md"
sys.path.insert(0, str(REPO))

from storage.jobs.arrays_doc import array_table_of, render_array_table, with_array_table  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite the table in {DOC.relative_to(REPO)}")
    mode.add_argument("--check", action="store_true", help="exit 1 when the table there is not current")
    args = parser.parse_args()
    table = render_array_table()
    if not (args.write or args.check):
        print(table)
        return 0
    text = DOC.read_text(encoding="utf-8")
    if args.check:
        if array_table_of(text) != table:
            print(f"{DOC.relative_to(REPO)}: the array table is stale; run {Path(__file__).name} --write")
            return 1
        return 0
    DOC.write_text(with_array_table(text, table), encoding="utf-8")
    print(f"wrote the array table of {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
