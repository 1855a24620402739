"""Research capture against independent references: row selection, token alternatives, hidden
states, presets, summary-only jobs and top heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from .export_helpers import export

PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 7, "Hi there"]


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    from .tiny_models import build_tiny_model

    return str(
        build_tiny_model(
            "llama", tmp_path_factory.mktemp("m") / "llama", overrides={"max_position_embeddings": 2048}
        )
    )


def _spec(folder: str, **capture: Any) -> dict[str, Any]:
    return {
        "model": {"id": folder},
        "prompts": PROMPTS,
        "generation": {"max_new_tokens": 6, "stop_at_eos": False},
        "capture": capture,
        "storage": {"chunk_rows": 32},
    }


def test_row_selection_keeps_exactly_the_selected_rows(long_llama: str, tmp_path: Path) -> None:
    full, _, _ = export(_spec(long_llama), tmp_path / "full.zarr")
    ranges = [[3, 40], [200, 230]]
    sel, _, _ = export(_spec(long_llama, query_rows=ranges, generation_steps=[0, 5]), tmp_path / "sel.zarr")
    for b in range(2):
        prompt_length, length = int(full["prompt_length"][b]), int(full["length"][b])
        expected = [
            p for p in range(length) if any(s <= p < e for s, e in ranges) or p - prompt_length in (0, 5)
        ]
        positions = sel["query_position"][b].values
        assert positions[: len(expected)].tolist() == expected and (positions[len(expected) :] == -1).all()
        got = sel["attention"][:, b, :, : len(expected)].values
        want = full["attention"][:, b, :, expected].values
        np.testing.assert_array_equal(got, want)
        assert not sel["attention"][:, b, :, len(expected) :].values.any()


def test_alternatives_and_hidden_states_match_eager(long_llama: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ds, _, _ = export(
        _spec(
            long_llama,
            alternatives=True,
            alternatives_k=4,
            prompt_alternatives=True,
            hidden_states=True,
            attention=False,
        ),
        tmp_path / "b.zarr",
    )
    model = AutoModelForCausalLM.from_pretrained(long_llama).eval()
    for b in range(2):
        length = int(ds["length"][b])
        tokens = ds["tokens"][b, :length].values
        with torch.no_grad():
            out = model(torch.tensor(tokens)[None], output_hidden_states=True)
        logprobs = torch.log_softmax(out.logits[0].float(), -1).numpy()  # row p predicts token p + 1
        top = np.argsort(-logprobs, axis=-1)[:, :4]
        np.testing.assert_array_equal(ds["topk_ids"][b, 1:length].values, top[: length - 1])
        np.testing.assert_allclose(
            ds["topk_logprobs"][b, 1:length].values,
            np.take_along_axis(logprobs, top, -1)[: length - 1],
            atol=1e-4,
        )
        np.testing.assert_allclose(
            ds["logprob"][b, 1:length].values, logprobs[np.arange(length - 1), tokens[1:]], atol=1e-4
        )
        assert np.isnan(ds["logprob"][b, 0]) and (ds["topk_ids"][b, 0].values == -1).all()
        generated = slice(int(ds["prompt_length"][b]), length)
        assert (ds["topk_ids"][b, generated, 0].values == tokens[generated]).all()  # greedy picks the top-1
        strings = ds["topk_tokens"][b, 1, :].values.tolist()
        assert all(isinstance(s, str) and s for s in strings)
        # hidden state after layer 0 (HF's last entry is after the final norm, so compare layer 0 only)
        np.testing.assert_allclose(
            ds["hidden_states"][0, b, :length].values, out.hidden_states[1][0].numpy(), atol=1e-4, rtol=1e-4
        )


def test_presets_expand_to_explicit_settings(long_llama: str, tmp_path: Path) -> None:
    ds, _, _ = export(_spec(long_llama, detail="summary"), tmp_path / "s.zarr")
    capture = ds.attrs["capture"]
    assert capture["detail"] == "summary" and capture["summary"] and capture["alternatives"]
    assert not capture["attention"] and not capture["qkv"] and not capture["hidden_states"]
    assert "attention" not in ds and "q" not in ds and "topk_ids" in ds
    summary = xr.open_zarr(str(tmp_path / "s.zarr"), group="summary", zarr_format=3)
    # a summary-only job still sees every row: all rows with >= 4 (s + W) = 272 keys of both layers
    prompt_length, length = int(ds["prompt_length"][0]), int(ds["length"][0])
    assert summary["rows"].values[:, 0].tolist() == [length - 272 + 1] * 2
    assert summary["rows"].values[:, 1].tolist() == [0, 0]  # "Hi there": too short
    assert (summary["label"].values[:, 1] == "undetermined").all()
    assert summary["context_min"].values[0, 0] == 272 and summary["context_max"].values[0, 0] == length
    assert prompt_length < length
    override, _, _ = export(_spec(long_llama, detail="full", qkv=False), tmp_path / "o.zarr")
    assert override.attrs["capture"]["qkv"] is False and "q" not in override and "hidden_states" in override


def test_top_heads_keep_the_best_ranked_heads(long_llama: str, tmp_path: Path) -> None:
    spec = _spec(
        long_llama, detail="top_heads", top_heads={"n": 2, "metric": "max_weight", "order": "highest"}
    )
    ds, hooks, _ = export(spec, tmp_path / "t.zarr")
    summary = xr.open_zarr(str(tmp_path / "t.zarr"), group="summary", zarr_format=3)
    pooled = summary["pooled_max_weight"].values  # [layer, head]
    expected = np.argsort(-pooled, axis=1, kind="stable")[:, :2]
    assert ds["top_head_index"].values.tolist() == expected.tolist()
    assert ds["attention"].dims == ("layer", "batch", "top_head", "query", "key")
    full, _, _ = export(_spec(long_llama), tmp_path / "f.zarr")
    for lp in range(2):
        for rank, head in enumerate(expected[lp]):
            for b in range(2):
                length = int(full["length"][b])
                np.testing.assert_allclose(
                    ds["attention"][lp, b, rank, :length, :length].values.astype(np.float32),
                    full["attention"][lp, b, head, :length, :length].values.astype(np.float32),
                    atol=2e-3,
                )
    assert hooks.units == hooks.units_total


def test_top_heads_refuses_prompts_too_short_to_rank(long_llama: str, tmp_path: Path) -> None:
    from storage.errors import InvalidJobSpec

    spec = _spec(long_llama, detail="top_heads")
    spec["prompts"] = ["short"]
    with pytest.raises(InvalidJobSpec, match="longer prompt"):
        export(spec, tmp_path / "x.zarr")


def test_stored_summary_equals_numpy_reference_from_exported_attention(
    long_llama: str, tmp_path: Path
) -> None:
    """The summary computed while rows streamed equals a plain numpy computation (the spec's
    formulas, tests/worker/test_metrics.py) over the same job's exported full attention."""
    from storage.bundle.labels import SummaryParams

    from .test_metrics import ROW_METRICS, reference_row

    spec = _spec(long_llama, attention=True, summary=True)
    spec["storage"]["attention_dtype"] = "float32"
    ds, _, _ = export(spec, tmp_path / "b.zarr")
    summary = xr.open_zarr(str(tmp_path / "b.zarr"), group="summary", zarr_format=3).load()
    params = SummaryParams()
    s, w = params.sink_tokens, params.local_window
    for lp in range(ds.sizes["layer"]):
        for b in range(ds.sizes["batch"]):
            length = int(ds["length"][b])
            att = ds["attention"][lp, b].values.astype(np.float64)  # [H, T, T]
            eligible = [t for t in range(length) if t + 1 >= params.min_keys]
            assert int(summary["rows"][lp, b]) == len(eligible)
            for h in range(ds.sizes["head"]):
                if not eligible:
                    assert summary["label"].values[lp, b, h] == "undetermined"
                    continue
                rows = [reference_row(att[h, t], t, s, w) for t in eligible]
                for name in ROW_METRICS:
                    want = np.mean([r[name] for r in rows])
                    got = float(summary[name][lp, b, h])
                    assert got == pytest.approx(want, rel=1e-3, abs=1e-4), (name, lp, b, h)
                entropy = [r["entropy"] for r in rows]
                np.testing.assert_allclose(
                    summary["entropy_quantiles"][lp, b, h].values,
                    np.quantile(entropy, [0.1, 0.5, 0.9]),
                    rtol=1e-4,
                )


def test_induction_probe_scores_match_eager_attention(long_llama: str, tmp_path: Path) -> None:
    """The probe's score equals the mean eager attention on the token after the previous occurrence."""
    from transformers import AutoModelForCausalLM

    from .oracle import eager_attentions
    from .tiny_models import BOS

    spec = _spec(long_llama, summary=True, attention=False, induction_probe={"length": 20, "seed": 3})
    export(spec, tmp_path / "b.zarr")
    summary = xr.open_zarr(str(tmp_path / "b.zarr"), group="summary", zarr_format=3).load()
    from storage.jobs.capture import InductionProbeSpec
    from worker.capture.induction import probe_tokens

    model = AutoModelForCausalLM.from_pretrained(long_llama)
    tokens = probe_tokens(InductionProbeSpec(length=20, seed=3), model.config.vocab_size, {256, 257}, [BOS])
    attentions = eager_attentions(long_llama, tokens)
    rows = np.arange(1 + 20 + 1, len(tokens))
    for layer, att in enumerate(attentions):
        want = att[:, rows, rows - 20 + 1].mean(axis=1)
        np.testing.assert_allclose(summary["induction"][layer].values, want, atol=1e-5)
    assert set(np.unique(summary["induction_head"].values)) <= {0, 1}
