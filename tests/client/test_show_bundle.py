"""describe_bundle on real Zarr v3 bundles written to tmp_path (zip, directory) and in memory."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from client_bundles import HEADS, JOB_ID, LAST_ROW_SEQ0, MODEL_ID, build_dataset

from qkvault.bundlefile import open_dataset
from qkvault.show import describe_bundle, stored_sizes
from storage.bundle.arrays import ARRAYS


def _array_line(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.split()[:1] == [name]:
            return line
    raise AssertionError(f"no line for array {name!r} in:\n{text}")


def test_zip_bundle_summary(make_bundle: Callable[..., Path]) -> None:
    ds = open_dataset(make_bundle("zip"))
    text = describe_bundle(ds, top=3)

    assert text.splitlines()[0] == f"qkvault bundle, format 1.0, job {JOB_ID} (complete)"
    assert f"model: {MODEL_ID}, LlamaForCausalLM, 3 layers, 4 heads / 2 kv heads, head_dim 4" in text

    header = next(line for line in text.splitlines() if line.split()[:1] == ["array"])
    assert header.split() == ["array", "dims", "shape", "dtype", "logical", "stored"]
    att = _array_line(text, "attention")
    assert "(layer, batch, head, query, key)" in att
    assert "(2, 2, 4, 7, 7)" in att and "float16" in att
    assert "1.6 kB" in att  # 2*2*4*7*7 values * 2 bytes = 1568 B
    assert re.search(r"\d+(\.\d)? (B|kB)\s*$", att), att  # a stored size in the last column
    assert "(layer, batch, kv_head, position, head_dim)" in _array_line(text, "k")
    assert "int32" in _array_line(text, "tokens")
    assert "total: " in text and "stored" in text

    # texts per sequence
    assert "[0]: 5 prompt + 2 generated tokens" in text
    assert "prompt:    'The cat sat'" in text and "generated: ' the mat'" in text
    assert "prompt:    'Hi!'" in text and "generated: ' How are'" in text

    # default layer = the middle exported one (layers 0, 2 -> 2); head 0; last captured row = 5
    assert "layer 2, head 0 (top 3 keys)" in text
    assert "[0] query position 5 ' the', row sums to 1.000" in text
    section = text.split("[0] query position 5")[1].split("[1] query position")[0]
    pattern = r"key\s+(\d+)\s+([\d.]+)\s+#*\s+('.*')"
    keys = [(int(m[1]), float(m[2]), m[3]) for m in re.finditer(pattern, section)]
    expected = sorted(enumerate(LAST_ROW_SEQ0), key=lambda kv: -kv[1])[:3]
    assert [k for k, _, _ in keys] == [k for k, _ in expected] == [0, 4, 2]
    assert [w for _, w, _ in keys] == pytest.approx([w for _, w in expected], abs=1e-3)
    assert [t for _, _, t in keys] == ["'<s>'", "' on'", "' cat'"]
    # sequence 1 is shorter: its last captured row is 3 and only keys 0..3 are listed
    seq1 = text.split("[1] query position 3 ' How'")[1]
    assert {int(m) for m in re.findall(r"key\s+(\d+)", seq1)} <= {0, 1, 2, 3}


def test_directory_bundle_has_stored_sizes(make_bundle: Callable[..., Path]) -> None:
    path = make_bundle("dir")
    ds = open_dataset(path)
    sizes = stored_sizes(ds)
    assert sizes is not None and sizes["attention"] > 0 and sizes["q"] > 0
    text = describe_bundle(ds, layer=0, head=HEADS - 1, top=2)
    assert "layer 0, head 3 (top 2 keys)" in text
    assert text.splitlines()[5].split()[-1] == "stored"


def test_each_array_meaning_comes_from_its_declaration() -> None:
    text = describe_bundle(build_dataset())
    meanings = text.split("\nmeaning:\n")[1].split("\n\n")[0].splitlines()
    described = {line.split()[0]: line.split(None, 1)[1] for line in meanings}
    assert described["attention"] == ARRAYS["attention"].description
    assert described["k"] == ARRAYS["k"].description and "tokens" in described


def test_in_memory_dataset_omits_stored_size() -> None:
    ds = build_dataset()
    assert stored_sizes(ds) is None
    text = describe_bundle(ds)
    header = next(line for line in text.splitlines() if line.split()[:1] == ["array"])
    assert header.split() == ["array", "dims", "shape", "dtype", "logical"]
    assert "row sums to 1.000" in text


def test_without_attention_skips_gracefully(make_bundle: Callable[..., Path]) -> None:
    text = describe_bundle(open_dataset(make_bundle("zip", attention=False)))
    assert "no `attention` array" in text and "skipped" in text
    assert _array_line(text, "q")  # the rest of the summary is still there
    assert "generated: ' the mat'" in text


def test_layer_or_head_not_exported_is_a_note(make_bundle: Callable[..., Path]) -> None:
    ds = open_dataset(make_bundle("zip"))
    assert "layer 1 was not exported (exported layers: 0, 2)" in describe_bundle(ds, layer=1)
    assert "head 7 was not exported (exported heads: 0, 1, 2, 3)" in describe_bundle(ds, head=7)


def test_missing_bundle_is_a_client_error(tmp_path: Path) -> None:
    from qkvault.errors import QkvaultClientError

    with pytest.raises(QkvaultClientError, match="bundle not found"):
        open_dataset(tmp_path / "nope.zarr.zip")
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("hello")
    with pytest.raises(QkvaultClientError, match="not a zip file"):
        open_dataset(not_zip)
