"""storage/sources/hfdatasets.py: Hugging Face datasets in local folders (JSON lines, Parquet, a
README's configurations, the hub-cache layout), streamed with ``datasets.load_dataset(...,
streaming=True)``; nothing is downloaded, paths outside the datasets folder are refused, bad rows
are named, and reading needs no torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.sources.hfdatasets import DatasetNotFound
from storage.sources.rows import SourceContext, SourceRow, SourceRowError, iter_rows
from storage.sources.spec import DatasetSource

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def datasets_dir(tmp_path: Path) -> Path:
    """A datasets folder: ``org/prompts`` (JSON lines, two splits), ``org/ids`` (Parquet, token
    ids), ``org/configs`` (two README configurations), ``org/cached`` in the hub-cache layout."""
    root = tmp_path / "datasets"
    write_jsonl(root / "org/prompts/data/train.jsonl", [{"text": f"train {i}", "n": i} for i in range(30)])
    write_jsonl(root / "org/prompts/data/validation.jsonl", [{"text": "valid 0", "n": 0}])
    (root / "org/ids/data").mkdir(parents=True)
    pq.write_table(
        pa.table({"input_ids": [[1, 2, 3], [4, 5]], "label": ["a", "b"]}),
        root / "org/ids/data/train-00000-of-00001.parquet",
    )
    write_jsonl(root / "org/configs/small/train.jsonl", [{"text": "small"}])
    write_jsonl(root / "org/configs/large/train.jsonl", [{"text": "large 0"}, {"text": "large 1"}])
    (root / "org/configs/README.md").write_text(
        textwrap.dedent(
            """\
            ---
            configs:
            - config_name: small
              data_files:
              - split: train
                path: small/*.jsonl
            - config_name: large
              data_files:
              - split: train
                path: large/*.jsonl
            ---
            """
        )
    )
    repo = root / "datasets--org--cached"
    write_jsonl(repo / "snapshots/abc123/data/train.jsonl", [{"text": "from the hub cache"}])
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text("abc123")
    write_jsonl(root / "org/bad/data/train.jsonl", [{"text": "ok"}, {"text": ""}])
    write_jsonl(root / "org/empty/data/train.jsonl", [])
    (root / "org/empty/data/train.jsonl").write_text("")
    return root


def read(datasets_dir: Path, **source: Any) -> list[SourceRow]:
    spec = DatasetSource.model_validate({"kind": "dataset", "column": "text", **source})
    return list(iter_rows(spec, SourceContext(datasets_dir=datasets_dir)))


def test_a_local_folder_is_streamed_by_split(datasets_dir: Path) -> None:
    train = read(datasets_dir, path="org/prompts")
    assert [(r.row, r.text) for r in train] == [(i, f"train {i}") for i in range(30)]
    assert [r.text for r in read(datasets_dir, path="org/prompts", split="validation")] == ["valid 0"]
    window = read(datasets_dir, path="org/prompts", offset=5, limit=3)
    assert [r.text for r in window] == ["train 5", "train 6", "train 7"]
    absolute = read(datasets_dir, path=str(datasets_dir / "org/prompts"), limit=1)
    assert [r.text for r in absolute] == ["train 0"]


def test_parquet_token_ids_configs_and_the_hub_cache_layout(datasets_dir: Path) -> None:
    ids = read(datasets_dir, path="org/ids", column="input_ids")
    assert [r.token_ids for r in ids] == [(1, 2, 3), (4, 5)] and ids[0].text is None
    assert [r.text for r in read(datasets_dir, path="org/configs", name="large")] == ["large 0", "large 1"]
    assert [r.text for r in read(datasets_dir, path="org/configs", name="small")] == ["small"]
    assert [r.text for r in read(datasets_dir, path="org/cached")] == ["from the hub cache"]


@pytest.mark.parametrize(
    ("source", "match", "field"),
    [
        ({"path": "/etc"}, "is not inside the datasets folder", "source.path"),
        ({"path": "../outside"}, "is not inside the datasets folder", "source.path"),
        ({"path": "."}, "is not inside the datasets folder", "source.path"),
        ({"path": "org/" + "n" * 256}, "has a path component of 256 bytes", "source.path"),
        (
            {"path": "org/prompts", "column": "body"},
            "has no column 'body'; its columns: 'text', 'n'",
            "source.column",
        ),
        ({"path": "org/prompts", "split": "test"}, "Bad split: test", "source.split"),
        ({"path": "org/configs", "name": "medium"}, "configuration 'medium'.*cannot be read", "source.name"),
        (
            {"path": "org/prompts", "column": "n"},
            r"split 'train' row 0, column 'n' is 0: a sequence is",
            "source",
        ),
        ({"path": "org/bad"}, r"row 1, column 'text' is an empty text", "source"),
        ({"path": "org/empty"}, "has no rows", "source"),
    ],
)
def test_bad_datasets_are_named(datasets_dir: Path, source: dict[str, Any], match: str, field: str) -> None:
    with pytest.raises(SourceRowError, match=match) as info:
        read(datasets_dir, **source)
    assert info.value.detail.get("field", "source") == field


def test_a_dataset_not_on_this_machine(datasets_dir: Path) -> None:
    with pytest.raises(DatasetNotFound, match="'org/absent' not found in the datasets folder") as info:
        read(datasets_dir, path="org/absent")
    assert "hf download --repo-type dataset org/absent" in str(info.value)


def test_a_link_out_of_the_datasets_folder_is_refused(datasets_dir: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "elsewhere/data/train.jsonl", [{"text": "secret"}])
    (datasets_dir / "org/link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SourceRowError, match="is not inside the datasets folder"):
        read(datasets_dir, path="org/link")


def test_reading_a_dataset_loads_no_torch(datasets_dir: Path) -> None:
    """The API samples datasets at admission: datasets would import torch (when installed) for an
    epoch counter shared with DataLoader workers."""
    code = textwrap.dedent(
        f"""
        import sys
        from storage.sources.rows import SourceContext, iter_rows
        from storage.sources.spec import DatasetSource
        source = DatasetSource(kind="dataset", path="org/prompts", column="text", limit=2)
        rows = list(iter_rows(source, SourceContext(datasets_dir={str(datasets_dir)!r})))
        assert [r.text for r in rows] == ["train 0", "train 1"], rows
        print("torch" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
