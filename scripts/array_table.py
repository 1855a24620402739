"""The array table of docs/bundle-format.md, from the array declarations (storage/bundle/arrays.py).

    .venv/bin/python scripts/array_table.py            # print the table
    .venv/bin/python scripts/array_table.py --write    # rewrite it in docs/bundle-format.md
    .venv/bin/python scripts/array_table.py --check    # exit 1 when the doc's table is stale

Each row is one ``ArraySpec`` of ``storage.bundle.arrays.ARRAYS`` (storage/jobs/arrays_doc.py
renders it): edit the declaration, not the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.jobs.arrays_doc import BEGIN, END, render_array_table  # noqa: E402
from storage.settings_doc import generated_table_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(
        generated_table_main(
            (__doc__ or "").splitlines()[0],
            doc=REPO / "docs" / "bundle-format.md",
            what="array table",
            table=render_array_table(),
            begin=BEGIN,
            end=END,
        )
    )
