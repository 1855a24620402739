"""Smoke test of ``python -m bench``: a tiny random Llama, 256 tokens, CPU, every mode measured."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.cli import main, parse_layers
from bench.codecs import main as codecs_main


def test_parse_layers() -> None:
    assert parse_layers("0,5,10-12") == [0, 5, 10, 11, 12]
    assert parse_layers("3") == [3]


def test_bench_tiny_cpu_reports_all_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "bench.json"
    store = tmp_path / "store"
    argv = ["--device", "cpu", "--model", "tiny", "--tokens", "256", "--qkv"]
    assert main([*argv, "--store", str(store), "--keep", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    statuses = dict(re.findall(r"^(naive|qkvault|raw write) {2,}(\S+) ", printed, re.MULTILINE))
    assert statuses == {"naive": "ok", "qkvault": "ok", "raw write": "ok"}
    assert "qkvault speedup vs naive:" in printed and "qkvault time / raw write time:" in printed

    figures = json.loads(out_json.read_text())
    modes = figures["modes"]
    assert {"naive", "qkvault", "raw write", "sdpa forward"} <= set(modes)
    for name in ("naive", "qkvault", "raw write"):
        mode = modes[name]
        assert mode["status"] == "ok", (name, mode["note"])
        assert mode["wall_s"] > 0 and mode["stored_bytes"] > 0 and mode["logical_gbps"] > 0
        assert mode["host_peak_bytes"] >= 0
    layers, heads, tokens, head_dim, kv_heads = 2, 4, 256, 16, 2
    attention = layers * heads * tokens * tokens * 2
    assert modes["naive"]["logical_bytes"] == attention
    assert (
        modes["qkvault"]["logical_bytes"]
        == attention + layers * tokens * head_dim * (heads + 2 * kv_heads) * 2
    )
    # naive: every layer's attention upcast to fp32 in one .npz
    assert modes["naive"]["stored_bytes"] > layers * heads * tokens * tokens * 4

    bundle = Path(modes["qkvault"]["bundle"])
    on_disk = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert modes["qkvault"]["stored_bytes"] == on_disk
    assert modes["raw write"]["stored_bytes"] == on_disk
    assert modes["qkvault"]["chunk_bytes"] <= on_disk
    assert modes["qkvault"]["exporter_timings_s"]["prefill"] > 0
    assert figures["speedup_vs_naive"] > 0 and figures["qkvault_over_raw_write"] > 0
    assert (
        not (bundle.parent / "raw-write").exists()
        and not (bundle.parent / "naive" / "attentions.npz").exists()
    )

    import xarray as xr

    ds = xr.open_zarr(str(bundle), consolidated=True)
    assert ds["attention"].shape == (layers, 1, heads, tokens, tokens)
    assert ds["q"].dtype.name == "float16"

    # the writer's own account: every chunk the hooks recorded, its bytes in and out
    stats = modes["qkvault"]["writer_stats"]
    row_chunks = [p for name in ("attention", "q", "k", "v") for p in (bundle / name / "c").rglob("*")]
    assert stats["chunks"] == sum(p.is_file() for p in row_chunks) == 8  # the rest is written by zarr
    assert stats["stored_bytes"] < modes["qkvault"]["chunk_bytes"]
    assert stats["input_bytes"] > stats["stored_bytes"] > 0 and stats["encode_s"] > 0
    assert modes["qkvault"]["writer_threads"]["store"] == 4
    assert re.search(r"qkvault writer: \d+ chunks, .* GB in, .* GB out \(ratio", printed)
    assert figures["run"]["compression"] == "lz4" and figures["run"]["chunk_rows"] == 512

    # the codec comparison on the bundle just written: lz4 and zstd as each array gets them, then
    # lz4's other two shuffles, the same input bytes
    capsys.readouterr()
    codecs_main([str(bundle), "--arrays", "attention,q"])
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("attention (float16): 2 chunks, 4 MB") for line in lines), lines  # 4x512x512x2
    ratios = [float(m) for m in re.findall(r"ratio (\d+\.\d+)", "\n".join(lines))]
    assert len(ratios) == 8 and ratios[0] > 1.2 and all(r > 0.99 for r in ratios), lines
    assert any(line.strip().startswith("lz4 noshuffle") for line in lines[:5]), lines


def test_bench_temp_store_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    argv = ["--device", "cpu", "--model", "tiny", "--tokens", "64", "--layers", "1", "--skip-naive"]
    assert main(argv) == 0
    # torch's own compile cache lands in TMPDIR when this process first needs it (order-dependent)
    assert [p for p in tmp_path.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_bench_tiny_cpu_derived_attention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--attention derived``: q/k stored, no T×T array, the naive T×T dump skipped; the report
    gives the bytes stored and the bytes full attention would need."""
    out_json = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--model", "tiny", "--tokens", "256", "--attention", "derived"]
    assert main([*argv, "--store", str(tmp_path / "store"), "--keep", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    statuses = dict(re.findall(r"^(naive|qkvault|raw write) {2,}(\S+) ", printed, re.MULTILINE))
    assert statuses == {"naive": "skipped", "qkvault": "ok", "raw write": "ok"}
    assert "derived attention (q/k):" in printed and "full attention would need" in printed

    figures = json.loads(out_json.read_text())
    qkvault = figures["modes"]["qkvault"]
    layers, heads, tokens, head_dim, kv_heads = 2, 4, 256, 16, 2
    assert figures["run"]["attention"] == "derived"
    assert qkvault["attention"] == "derived"
    assert qkvault["full_attention_bytes"] == layers * heads * tokens * (tokens + 1) // 2 * 2
    assert qkvault["logical_bytes"] == layers * tokens * head_dim * (heads + kv_heads) * 2
    bundle = Path(qkvault["bundle"])
    assert qkvault["stored_bytes"] < qkvault["full_attention_bytes"]
    assert not (bundle / "attention").exists() and not (bundle / "v").exists()

    from storage.bundle import Bundle

    opened = Bundle(bundle)
    assert opened.derived and opened.dataset["q"].dtype.name == "float16"
    row = opened.attention(1, 3, query=tokens - 1)
    assert row.shape == (tokens,) and abs(float(row.sum()) - 1.0) < 1e-5
