"""Smoke test of ``python -m bench.bulk``: a tiny random Llama on CPU, a handful of prompts, every
mode measured on the same micro-batches (no assertion on speed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.bulk import PLAIN, RAW, main, text_prompts, workload

MODES = [PLAIN, "summary", "derived", "hidden states", RAW, "full attention"]


def test_bulk_bench_reports_every_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, store = tmp_path / "bulk.json", tmp_path / "store"
    argv = ["--device", "cpu", "--model", "tiny", "--prompts", "6", "--max-tokens", "64"]
    argv += ["--new-tokens", "2", "--token-budget", "160", "--max-sequences", "4"]
    assert main([*argv, "--store", str(store), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("command: python -m bench.bulk --device cpu --model tiny")
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
        if name not in (PLAIN, RAW):
            assert mode["bytes_written"] > 0 and mode["capture"] is not None
            assert ratios[name]["x_plain"] == pytest.approx(plain["seconds"] / mode["seconds"])
            assert mode["tokens_per_s"] == pytest.approx(mode["tokens"] / mode["seconds"])
    hidden, raw = modes["hidden states"], modes[RAW]
    assert raw["bytes_written"] == hidden["bytes_written"] > 0
    assert raw["extra"]["files"] == hidden["extra"]["files"]
    assert ratios["hidden states"]["x_raw"] == pytest.approx(hidden["seconds"] / raw["seconds"])
    assert ratios[RAW]["x_plain"] is None and ratios["summary"]["x_raw"] is None
    assert modes["full attention"]["capture"]["layers"] == [0, 1]  # the tiny model's two layers
    assert modes["hidden states"]["capture"] == {"attention": False, "hidden_states": True, "layers": None}
    assert figures["run"]["new_tokens"] == 2 and figures["machine"]["cpus"] >= 1
    # generated tokens: each mode's decoding time per step beside plain generation's
    decode_rows = re.findall(r"^\| ([a-z ]+) \| (\d+\.\d+) \| (\d+\.\d+)× \|$", printed, re.MULTILINE)
    assert [r[0] for r in decode_rows] == [m for m in MODES if m != RAW]
    for name, mode in modes.items():
        if name != RAW:
            assert mode["extra"]["decode_s"] > 0
            expected = mode["extra"]["decode_s"] / plain["extra"]["decode_s"]
            assert ratios[name]["decode_x_plain"] == pytest.approx(expected)
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
