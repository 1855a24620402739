"""storage/sources/sample.py: the sample a bulk job's admission reads (count and spread of rows)
from real uploads in a local store, checked against the rows the worker would read."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.sources import sample as sample_module
from storage.sources.rows import SourceContext, SourceRowError, iter_rows
from storage.sources.sample import sample_source
from storage.sources.spec import DatasetSource, FileSource, PromptsSource, TokenIdsSource
from storage.stores.objectstore import ObjectStore
from tests.storage.test_sources_datasets import write_jsonl
from tests.storage.test_sources_files import OWNER, put


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(str(tmp_path / "store"))


def _context(store: ObjectStore) -> SourceContext:
    return SourceContext(store=store, owner=OWNER)


def _texts(n: int, seed: int = 0) -> list[str]:
    """Texts whose lengths grow along the file (a sorted file: a prefix sample would be wrong)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(1000)}" for _ in range(1 + i * 40 // n)) for i in range(n)]


def test_inline_sources_are_counted_exactly_and_strided() -> None:
    prompts = PromptsSource(kind="prompts", prompts=[f"p{i}" for i in range(50)], offset=10, limit=25)
    got = sample_source(prompts, SourceContext(), rows=10)
    assert (got.sequences, got.exact) == (25, True)
    assert [text for text, _ in got.rows] == [f"p{i}" for i in range(0, 50, 5)]
    ids = TokenIdsSource(kind="token_ids", token_ids=[[1, 2], [3]], offset=1)
    got = sample_source(ids, SourceContext())
    assert (got.sequences, got.rows) == (1, [(None, (1, 2)), (None, (3,))])


def test_a_small_jsonl_file_is_read_whole(store: ObjectStore) -> None:
    texts = _texts(300)
    upload = put(store, "".join(json.dumps({"text": t}) + "\n" for t in texts).encode(), piece=1 << 16)
    source = FileSource(kind="file", upload=upload, format="jsonl", offset=100)
    got = sample_source(source, _context(store), rows=50)
    assert (got.sequences, got.exact) == (200, True)
    assert [t for t, _ in got.rows] == texts[::6]


def test_a_large_text_file_is_sampled_in_windows_over_the_whole_file(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sample_module, "WHOLE_FILE_BYTES", 10_000)
    monkeypatch.setattr(sample_module, "WINDOW_BYTES", 2_000)
    texts = _texts(4000, seed=1)
    lines = [t if i % 50 else "" for i, t in enumerate(texts)]  # blank lines are no rows
    data = ("\n".join(lines) + "\n").encode()
    upload = put(store, data, piece=1 << 16)
    source = FileSource(kind="file", upload=upload, format="text", limit=5000)
    got = sample_source(source, _context(store), rows=320)
    assert not got.exact and len(got.rows) <= 320
    real = [row.text or "" for row in iter_rows(source, _context(store))]
    # a file sorted by length is the hard case for an estimate from bytes per line: within 10%
    assert got.sequences is not None and abs(got.sequences - len(real)) / len(real) < 0.1, got.how
    assert all(text in set(real) for text, _ in got.rows)  # whole rows, not pieces of lines
    words = sorted(len(t.split()) for t, _ in got.rows if t)
    mean_sample, mean_real = sum(words) / len(words), sum(len(t.split()) for t in real) / len(real)
    assert abs(mean_sample - mean_real) / mean_real < 0.1  # a prefix sample would be ~2x too short
    real_words = sorted(len(t.split()) for t in real)
    assert words[0] <= real_words[len(real) // 4] and words[-1] >= real_words[-len(real) // 4]  # both ends


def test_a_bad_line_deep_in_a_large_file_is_named_by_its_byte_offset(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sample_module, "WHOLE_FILE_BYTES", 1_000)
    monkeypatch.setattr(sample_module, "WINDOW_BYTES", 500)
    lines = [json.dumps({"text": f"row {i}"}) for i in range(400)]
    lines[200] = json.dumps({"body": "no text field"})
    data = ("\n".join(lines) + "\n").encode()
    upload = put(store, data, piece=1 << 16)
    offset = len("\n".join(lines[:200])) + 1
    source = FileSource(kind="file", upload=upload, format="jsonl")
    with pytest.raises(SourceRowError, match=f"line at byte {offset:,}.*field 'text'"):
        sample_source(source, _context(store), rows=400)


def test_parquet_counts_from_metadata_and_samples_every_row_group(store: ObjectStore, tmp_path: Path) -> None:
    texts = _texts(1000, seed=2)
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": texts}), path, row_group_size=100)
    upload = put(store, path.read_bytes(), piece=1 << 16)
    source = FileSource(kind="file", upload=upload, format="parquet", field="body", offset=900, limit=500)
    got = sample_source(source, _context(store), rows=64)
    assert (got.sequences, got.exact) == (100, True)
    assert len(got.rows) == 70  # 10 row groups, 7 rows each
    assert [t for t, _ in got.rows[-7:]] == texts[900:907]  # the last row group's first rows


def test_a_local_dataset_sample_and_count(tmp_path: Path) -> None:
    datasets_dir = tmp_path / "datasets"
    write_jsonl(datasets_dir / "corpus" / "train.jsonl", [{"text": f"doc {i}"} for i in range(30)])
    source = DatasetSource(kind="dataset", path="corpus", split="train", column="text", offset=5)
    got = sample_source(source, SourceContext(datasets_dir=datasets_dir), rows=100)
    assert (got.sequences, got.exact, len(got.rows)) == (25, True, 30)
    got = sample_source(source, SourceContext(datasets_dir=datasets_dir), rows=10)
    assert got.sequences is None and len(got.rows) == 10  # data files record no size
