"""The table of ``QKVAULT_*`` environment variables in docs/operations.md, from the settings classes.

    .venv/bin/python scripts/settings_table.py            # print the table
    .venv/bin/python scripts/settings_table.py --write    # rewrite it in docs/operations.md
    .venv/bin/python scripts/settings_table.py --check    # exit 1 when the doc's table is stale

The classes are each deployable's: api.settings.ApiSettings, worker.settings.WorkerSettings and
qkvault.settings.ClientSettings; their field descriptions are the table's text (storage/settings_doc.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import api.settings  # noqa: E402, F401  (each import registers its deployable's class)
import qkvault.settings  # noqa: E402, F401
import worker.settings  # noqa: E402, F401
from storage.settings_doc import deployables, generated_table_main, render_env_table  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(
        generated_table_main(
            (__doc__ or "").splitlines()[0],
            doc=REPO / "docs" / "operations.md",
            what="settings table",
            table=render_env_table(deployables()),
        )
    )
