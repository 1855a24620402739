"""docs/kv-fidelity-table.md (written by ``python -m bench.kv_fidelity_table``) cannot drift: every
row is measured again, one method per test (a method's rows do not depend on the others), and must
equal the table's (fidelity to within one unit of its last printed digit: float sums differ in the
last bits between runs; stored ratios exactly); its theoretical ratios are what the KV registry's
accounting gives for the token count in its header, and docs/kv-compression.md shows the table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.split("|")[1:-1]]


def _close(measured: str, documented: str) -> bool:
    """Equal, or within one unit of the last printed digit (``0.1876`` vs ``0.1877``)."""
    if measured == documented or measured.endswith("×"):
        return measured == documented
    decimals = len(documented.partition(".")[2])
    return abs(float(measured) - float(documented)) <= 1.01 * 10.0**-decimals


@pytest.mark.slow
@pytest.mark.parametrize("method", ["turboquant_prod", "turboquant_mse", "kivi"])
def test_the_measured_rows_regenerate(method: str) -> None:
    from bench.kv_fidelity_table import METHODS, measure

    table = measure([m for m in METHODS if m[0] == method], device="cpu")
    documented = {
        tuple(_cells(line)[:2]): _cells(line)
        for line in _table().splitlines()
        if line.startswith(f"| {method} |")
    }
    assert table.header == _table().splitlines()[0]
    assert len(table.rows) == len(documented) == 3
    for row in table.rows:
        cells = _cells(row)
        expected = documented[tuple(cells[:2])]
        assert all(_close(m, d) for m, d in zip(cells, expected, strict=True)), (cells, expected)
