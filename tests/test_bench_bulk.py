"""Smoke test of ``python -m bench.bulk``: a tiny random Llama on CPU, a handful of prompts, every
mode measured on the same micro-batches (no assertion on speed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench.bulk import PLAIN, RAW, RAW_DERIVED, _longest_of_each_width, main, text_prompts, workload

MODES = [PLAIN, "summary", "derived", RAW_DERIVED, "hidden states", RAW, "full attention"]


def test_bulk_bench_reports_every_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, store = tmp_path / "bulk.json", tmp_path / "store"
    argv = ["--device", "cpu", "--model", "tiny", "--prompts", "6", "--max-tokens", "64"]
    argv += ["--new-tokens", "2", "--token-budget", "160", "--max-sequences", "4"]
    assert main([*argv, "--store", str(store), "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert printed.startswith("command: python -m bench.bulk --device cpu --model tiny")
    # each timed mode's seconds on stderr as it ends (raw writes are not modes of the job)
    timed = re.findall(r"^timed ([a-z ]+): \d+\.\d\d s$", captured.err, re.MULTILINE)
    assert timed == [m for m in MODES if m not in (RAW, RAW_DERIVED)]
    assert re.search(r"^machine: .*; \d+ CPUs; torch ", printed, re.MULTILINE)
    rows = re.findall(r"^\| ([a-z ]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|", printed, re.MULTILINE)
    assert [r[0] for r in rows] == MODES
    assert len({r[1:] for r in rows}) == 1  # sequences, tokens, padded tokens: equal in every mode
    assert re.search(r"^\d+ micro-batches; padding \d+\.\d% of the padded tokens$", printed, re.MULTILINE)

    figures = json.loads(out_json.read_text())
    modes, ratios = figures["modes"], figures["ratios"]
    assert list(modes) == MODES
    plain = modes[PLAIN]
    assert plain["sequences"] == 6 and plain["micro_batches"] > 1 and plain["bytes_written"] == 0
    assert plain["tokens"] < plain["padded_tokens"] <= plain["micro_batches"] * 160
    for name, mode in modes.items():
        assert mode["seconds"] > 0
        assert (mode["tokens"], mode["padded_tokens"]) == (plain["tokens"], plain["padded_tokens"])
        if name not in (PLAIN, RAW, RAW_DERIVED):
            assert mode["bytes_written"] > 0 and mode["capture"] is not None
            assert ratios[name]["x_plain"] == pytest.approx(plain["seconds"] / mode["seconds"])
            assert mode["tokens_per_s"] == pytest.approx(mode["tokens"] / mode["seconds"])
    # each of hidden states and derived beside a raw write of its own bytes, in the same run
    for name, raw_name in (("hidden states", RAW), ("derived", RAW_DERIVED)):
        mode, raw = modes[name], modes[raw_name]
        assert raw["bytes_written"] == mode["bytes_written"] > 0 and raw["extra"]["of"] == name
        assert raw["extra"]["files"] == mode["extra"]["files"]
        assert ratios[name]["x_raw"] == pytest.approx(mode["seconds"] / raw["seconds"])
        assert ratios[raw_name]["x_plain"] is None and ratios[raw_name]["x_raw"] is None
    assert modes["derived"]["bytes_written"] != modes["hidden states"]["bytes_written"]
    assert ratios["summary"]["x_raw"] is None and ratios["full attention"]["x_raw"] is None
    x_raw = re.findall(r"^\| (derived|hidden states) \| [\d,]+ \|.*\| (\d+\.\d+)× \|$", printed, re.MULTILINE)
    assert [name for name, _ in x_raw] == ["derived", "hidden states"]
    assert modes["full attention"]["capture"]["layers"] == [0, 1]  # the tiny model's two layers
    assert modes["hidden states"]["capture"] == {"attention": False, "hidden_states": True, "layers": None}
    assert figures["run"]["new_tokens"] == 2 and figures["machine"]["cpus"] >= 1
    # generated tokens: each mode's decoding time per step beside plain generation's
    decode_rows = re.findall(r"^\| ([a-z ]+) \| (\d+\.\d+) \| (\d+\.\d+)× \|$", printed, re.MULTILINE)
    assert [r[0] for r in decode_rows] == [m for m in MODES if m not in (RAW, RAW_DERIVED)]
    for name, mode in modes.items():
        if name not in (RAW, RAW_DERIVED):
            assert mode["extra"]["decode_s"] > 0
            expected = mode["extra"]["decode_s"] / plain["extra"]["decode_s"]
            assert ratios[name]["decode_x_plain"] == pytest.approx(expected)
    # each qkvault mode's job phases: the forward thread's, the capture's share of it, the drains'
    phases = re.findall(
        r"^\| ([a-z ]+) \| (\d+\.\d+) \| (\d+\.\d+) \|(?: \d+\.\d+ \|){11}$", printed, re.MULTILINE
    )
    assert [name for name, _, _ in phases] == [m for m in MODES if m not in (PLAIN, RAW, RAW_DERIVED)]
    for name, prefill, capture_host in phases:
        assert float(capture_host) <= float(prefill), name
        timings = modes[name]["extra"]["timings_s"]
        assert timings["micro_batches_prefill_capture_host"] >= 0, name  # rounded to milliseconds
        assert 0 < timings["micro_batches_decode_capture_host"] <= timings["micro_batches_decode"], name
        assert timings["micro_batches_pinned_wait"] == 0.0, name  # no pinned ring on the CPU
        assert timings["micro_batches_copy_wait"] == 0.0, name  # nor copies to wait for
        assert timings["micro_batches_finish_wait"] == 0.0, name  # nor a device queue for the drains
        for phase in ("setup", "passes_setup"):  # the forward thread's work around the passes
            assert timings[f"micro_batches_{phase}"] > 0, (name, phase)
        for phase in ("finish_host", "passes_end"):  # rounded to milliseconds: under 0.5 ms on the tiny model
            assert timings[f"micro_batches_{phase}"] >= 0, (name, phase)
    # the chunk writers of the modes that stream row blocks: their thread-seconds and bytes
    row = r"^\| ([a-z ]+) \| ([\d,]+) \|(?: \d+\.\d+ \|){4} [\d.]+ / [\d.]+ \|$"
    writers = re.findall(row, printed, re.MULTILINE)
    assert [name for name, _ in writers] == ["derived", "hidden states", "full attention"]
    for name, chunks in writers:
        stats = modes[name]["extra"]["writer"]
        assert stats["chunks"] == int(chunks.replace(",", "")) > 0 and stats["encode_s"] > 0, name
        assert 0 < stats["stored_bytes"] <= modes[name]["bytes_written"], name
    assert modes["summary"]["extra"]["writer"]["chunks"] == 0  # its arrays are written whole
    assert not any(store.iterdir())  # every bundle and the raw-write files removed


def test_prompts_are_deterministic_and_capped() -> None:
    from worker.archmatrix.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    ids = text_prompts(tok, 50, 16, 300)
    assert ids == text_prompts(tok, 50, 16, 300) and ids != text_prompts(tok, 50, 16, 300, seed=1)
    lengths = [len(s) for s in ids]
    assert min(lengths) >= 16 and max(lengths) <= 300 and max(lengths) > 4 * min(lengths)
    work = workload(ids, 3, 1024, 8)
    planned = sorted(i for batch in work.batches for i in batch.sequences)
    assert planned == list(range(50))  # every prompt once
    assert work.padding.tokens == sum(lengths) + 3 * 50


def test_profile_writes_each_timed_modes_operator_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--profile DIR``: plain and each chosen mode run under the profiler; each table names the
    operators that mode ran (the capture's own in the summary mode, not in plain). Off CUDA there
    is no idle report, and ``--timeline`` records nothing (no table)."""
    argv = ["--device", "cpu", "--model", "tiny", "--prompts", "4", "--max-tokens", "48", "--new-tokens", "2"]
    argv += ["--modes", "summary", "--store", str(tmp_path / "store"), "--profile", str(tmp_path / "prof")]
    assert main([*argv, "--timeline"]) == 0
    out = capsys.readouterr().out
    assert f"operator tables in {tmp_path / 'prof'}" in out and "between forwards" not in out
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == ["plain.txt", "summary.txt"]
    plain, summary = ((tmp_path / "prof" / f"{n}.txt").read_text() for n in ("plain", "summary"))
    assert plain.startswith("# plain: by self CPU time") and "aten::" in plain
    assert summary.startswith("# summary: by self CPU time") and "aten::" in summary
    assert "aten::bmm" not in plain and "aten::bmm" in summary  # the probabilities' q kᵀ


def test_the_warm_up_takes_the_longest_prompt_of_each_decoding_width() -> None:
    """With generated tokens, the decoding rows are observed at their sequence's width (a power of
    two at or above prompt + new tokens): the warm-up compiles each with the longest prompt of it."""
    ids = [[0] * n for n in (18, 22, 42, 61, 130, 204, 505, 971)]
    chosen = _longest_of_each_width(ids, 32)
    assert {width: len(p) for width, p in chosen.items()} == {64: 22, 128: 61, 256: 204, 1024: 971}
    assert {width: len(p) for width, p in _longest_of_each_width(ids, 0).items()} == {
        32: 22, 64: 61, 256: 204, 512: 505, 1024: 971,
    }  # fmt: skip


def test_the_chunk_writers_threads_reach_every_modes_writers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--encode-threads`` / ``--encoder`` / ``--io-threads``: the writer of every micro-batch
    (and of the bulk job's root) gets them (a worker's are ``QKVAULT_WRITE_THREADS`` and
    ``QKVAULT_WRITE_PROCESSES``); the codec of ``--compression`` is every micro-batch's."""
    import worker.bulk
    from storage.bundle.layout import BundleLayout
    from storage.bundle.writer import BundleWriter

    threads: list[tuple[int | None, bool | None, int | None]] = []
    codecs: list[str] = []

    class Recorded(BundleWriter):
        def __init__(self, url: str, **options: Any) -> None:
            threads.append(
                (options.get("write_threads"), options.get("write_processes"), options.get("io_threads"))
            )
            super().__init__(url, **options)

        def create(self, layout: BundleLayout, attrs: dict[str, Any]) -> None:
            codecs.append(layout.compression)
            super().create(layout, attrs)

    monkeypatch.setattr(worker.bulk, "BundleWriter", Recorded)
    argv = ["--device", "cpu", "--model", "tiny", "--prompts", "4", "--max-tokens", "48"]
    argv += ["--modes", "derived", "--store", str(tmp_path / "store"), "--encode-threads", "3"]
    argv += ["--compression", "none"]
    argv += ["--encoder", "threads"]
    assert main([*argv, "--io-threads", "2", "--json", str(tmp_path / "bulk.json")]) == 0
    out = capsys.readouterr().out
    assert "chunk writer: 3 encoder threads (encoding in threads), 2 store threads, codec none" in out
    assert len(threads) > 2 and set(threads) == {(3, False, 2)}  # warm-up and timed runs, root and batches
    assert codecs and set(codecs) == {"none"}
    run = json.loads((tmp_path / "bulk.json").read_text())["run"]
    assert (run["encode_threads"], run["encoder"], run["io_threads"]) == (3, "threads", 2)
