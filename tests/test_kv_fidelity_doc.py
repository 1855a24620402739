"""docs/kv-fidelity-table.md (written by scripts/kv_fidelity_table.py) cannot drift: its theoretical
ratios are what the KV registry's accounting gives for the token count in its header, and
docs/kv-compression.md shows the same table. (Regenerating the measured columns takes minutes on
2 cores: the script's command is in docs/kv-compression.md.)"""

from __future__ import annotations

import re
from pathlib import Path

from storage.kvquant.registry import kv_method
from storage.kvquant.spec import KVMethodSpec

DOCS = Path(__file__).resolve().parents[1] / "docs"
HEAD_DIM = 64  # SmolLM2-135M


def _table() -> str:
    return (DOCS / "kv-fidelity-table.md").read_text(encoding="utf-8").strip()


def test_theoretical_ratios_are_the_accounting_of_the_registry() -> None:
    table = _table()
    match = re.search(r"(\d+) tokens", table)
    assert match is not None
    tokens = int(match.group(1))
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "×" in line]
    assert len(rows) == 9
    for cells in rows:
        method, bits, theoretical = cells[0].strip(), int(cells[1]), cells[-1].strip().rstrip("×")
        spec = KVMethodSpec(method=method, bits=bits)
        job_bits = kv_method(method).job_bits(spec, HEAD_DIM, [tokens])
        assert f"{2 * 16 * HEAD_DIM * tokens / job_bits:.2f}" == theoretical, (method, bits)


def test_the_kv_compression_page_shows_the_generated_table() -> None:
    assert _table() in (DOCS / "kv-compression.md").read_text(encoding="utf-8")
