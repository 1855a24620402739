"""The worker's self-check (``worker.capture.certify``) on hand-built attention calls.

The "model output" is computed here the way an eager attention function does it (float64:
scores, soft-cap, additive mask with ``finfo.min`` on hidden keys, sink column joined then dropped,
probabilities @ V, transposed to ``[B, Tq, H, Dv]``) for a left-padded batch of two sequences; the
certifier is driven the way ``worker/capture/session.py`` drives it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import worker.capture.certify as certify
from storage.errors import CertificationFailed
from worker.capture.attention_math import attention_probs
from worker.capture.certify import (
    MICRO_BATCH_LAYER_STRIDE,
    OUTPUT_TOLERANCE,
    ROW_SUM_TOLERANCE,
    SAMPLE_ROWS,
    Certifier,
    micro_batch_layers,
)
from worker.capture.hook import AttentionCall

LAYER = 2
PADS = (0, 6)  # sequence 1 has 6 real rows (fewer than SAMPLE_ROWS): its padding rows are not checked
LENGTH = 12
DIM, DV = 8, 6
SCALING = 0.35
MIN = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class Case:
    heads: int = 4
    kv_heads: int = 4
    softcap: float | None = None
    sinks: bool = False
    alibi: bool = False  # additive float mask (per-head ALiBi bias + finfo.min) instead of a bool mask
    no_mask: bool = False  # mask=None: plain causal (unpadded batch), with a sliding window
    q_scale: float = 1.0


CASES = {
    "plain": Case(),
    "gqa": Case(kv_heads=2),
    "softcap": Case(kv_heads=2, softcap=2.0, q_scale=3.0),
    "sinks": Case(kv_heads=2, sinks=True),
    "sinks+softcap+alibi": Case(kv_heads=2, softcap=2.0, sinks=True, alibi=True, q_scale=3.0),
    "causal-window-no-mask": Case(kv_heads=2, no_mask=True, sinks=True),
}
WINDOW = 5


def left_padded_mask(pads: tuple[int, ...], length: int) -> torch.Tensor:
    """Bool ``[B, 1, T, T]``, True = attend: causal over each sequence's real tokens (left padding)."""
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    return torch.stack([((j <= i) & (j >= pad))[None] for pad in pads])


def alibi_bias(heads: int, length: int) -> torch.Tensor:
    """``[1, H, T, T]``: -slope_h · (i - j)."""
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(heads)])
    distance = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).float()
    return (-slopes[:, None, None] * distance)[None]


def eager_output(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """What an eager attention function returns, ``[B, Tq, H, Dv]`` float32 (computed in float64)."""
    heads = query.shape[1]
    groups = heads // key.shape[1]
    k = key.double().repeat_interleave(groups, dim=1)
    v = value.double().repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        additive = torch.where(mask, 0.0, MIN).double() if mask.dtype == torch.bool else mask.double()
        scores = scores + additive
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).float()


def make_call(case: Case, seed: int = 0) -> tuple[AttentionCall, tuple[int, ...]]:
    """A prefill call of layer ``LAYER`` whose output is the eager attention of its own inputs."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(PADS)
    query = torch.randn(batch, case.heads, LENGTH, DIM, generator=gen) * case.q_scale
    key = torch.randn(batch, case.kv_heads, LENGTH, DIM, generator=gen)
    value = torch.randn(batch, case.kv_heads, LENGTH, DV, generator=gen)
    sinks = torch.randn(case.heads, generator=gen) + 1.0 if case.sinks else None
    pads = PADS
    mask: torch.Tensor | None
    window = None
    if case.no_mask:
        pads, window = (0, 0), WINDOW
        i = torch.arange(LENGTH)[:, None]
        j = torch.arange(LENGTH)[None, :]
        model_mask: torch.Tensor | None = ((j <= i) & (i - j < WINDOW))[None, None].expand(batch, 1, -1, -1)
        mask = None
    elif case.alibi:
        bias = alibi_bias(case.heads, LENGTH)
        mask = torch.where(left_padded_mask(pads, LENGTH), bias, MIN)  # [B, H, T, T]
        model_mask = mask
    else:
        mask = model_mask = left_padded_mask(pads, LENGTH)
    output = eager_output(query, key, value, model_mask, scaling=SCALING, softcap=case.softcap, sinks=sinks)
    call = AttentionCall(
        layer_idx=LAYER,
        query=query,
        key=key,
        value=value,
        mask=mask,
        scaling=SCALING,
        sliding_window=window,
        softcap=case.softcap,
        sinks=sinks,
        output=output,
    )
    return call, pads


def certify_prefill(certifier: Certifier, call: AttentionCall, pads: tuple[int, ...]) -> bool:
    """As the session does for a prefill call (q_start 0, keys = the call's positions)."""
    if not certifier.due(call.layer_idx, call.query.shape[2]):
        return False
    for b, pad in enumerate(pads):
        certifier.check(call, b, pad, pad, 0, 0)
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_eager_attention_passes(name: str) -> None:
    call, pads = make_call(CASES[name])
    certifier = Certifier((0, LAYER), "float32", provenance={"attn_implementation": "eager"})
    assert certify_prefill(certifier, call, pads)
    cert = certifier.certificate()
    assert cert["tolerance"] == {"row_sum": ROW_SUM_TOLERANCE, "output_relative": OUTPUT_TOLERANCE["float32"]}
    assert cert["sample_rows"] == SAMPLE_ROWS and cert["provenance"] == {"attn_implementation": "eager"}
    worst = cert["max"]
    assert worst["row_sum_error"] < ROW_SUM_TOLERANCE / 10
    assert worst["masked_mass"] == 0.0
    assert worst["output_error"] < OUTPUT_TOLERANCE["float32"] / 10
    layer = cert["layers"][str(LAYER)]
    assert layer["calls"] == len(pads)
    # the last SAMPLE_ROWS rows of each sequence, never its padding rows
    assert layer["rows"] == sum(min(SAMPLE_ROWS, LENGTH - pad) for pad in pads)
    assert set(cert["layers"]) == {str(LAYER)}


def test_decode_call_passes() -> None:
    """A decode step (one new row, keys 0..T) with sinks, checked as the session does:
    q_start = T, k_abs0 = 0, i0 = 0, j0 = pad."""
    prefill, pads = make_call(CASES["sinks"])
    gen = torch.Generator().manual_seed(1)
    batch, heads, kv_heads = len(pads), prefill.query.shape[1], prefill.key.shape[1]
    query = torch.randn(batch, heads, 1, DIM, generator=gen)
    key = torch.cat([prefill.key, torch.randn(batch, kv_heads, 1, DIM, generator=gen)], dim=2)
    value = torch.cat([prefill.value, torch.randn(batch, kv_heads, 1, DV, generator=gen)], dim=2)
    mask = left_padded_mask(pads, LENGTH + 1)[:, :, -1:]  # [B, 1, 1, T + 1]
    call = AttentionCall(
        layer_idx=LAYER,
        query=query,
        key=key,
        value=value,
        mask=mask,
        scaling=SCALING,
        sliding_window=None,
        sinks=prefill.sinks,
        output=eager_output(query, key, value, mask, scaling=SCALING, sinks=prefill.sinks),
    )
    certifier = Certifier((LAYER,), "float32")
    assert certify_prefill(certifier, prefill, pads)
    assert certifier.due(LAYER, 1)
    for b, pad in enumerate(pads):
        certifier.check(call, b, 0, pad, LENGTH, 0)
    layer = certifier.certificate()["layers"][str(LAYER)]
    assert layer["calls"] == 2 * len(pads) and layer["output_error"] < OUTPUT_TOLERANCE["float32"]


def _raises_for_layer(
    certifier: Certifier, call: AttentionCall, pads: tuple[int, ...]
) -> CertificationFailed:
    assert certify_prefill(certifier, call, pads)  # the checks wait for nothing: read when settled
    with pytest.raises(CertificationFailed, match=rf"^layer {LAYER}: ") as caught:
        certifier.settle()
    assert caught.value.detail["layer"] == LAYER
    return caught.value


def _without_sinks(case: Case) -> AttentionCall:
    call, _ = make_call(case)
    model = eager_output(
        call.query, call.key, call.value, call.mask, scaling=SCALING, softcap=case.softcap, sinks=None
    )
    return dataclasses.replace(call, output=model)


@pytest.mark.parametrize("name", ["sinks", "sinks+softcap+alibi"])
def test_fails_when_the_model_used_sinks_the_call_lacks(name: str) -> None:
    call, pads = make_call(CASES[name])
    assert call.sinks is not None
    error = _raises_for_layer(Certifier((LAYER,), "float32"), dataclasses.replace(call, sinks=None), pads)
    assert "attention output" in error.message
    assert error.detail["output_error"] > OUTPUT_TOLERANCE["float32"]


@pytest.mark.parametrize("name", ["sinks", "sinks+softcap+alibi"])
def test_fails_when_the_call_has_sinks_the_model_did_not_use(name: str) -> None:
    call = _without_sinks(CASES[name])
    error = _raises_for_layer(Certifier((LAYER,), "float32"), call, PADS)
    assert "attention output" in error.message
    assert error.detail["output_error"] > OUTPUT_TOLERANCE["float32"]


@pytest.mark.parametrize("name", ["plain", "softcap", "sinks"])
def test_fails_when_the_model_used_another_scaling(name: str) -> None:
    call, pads = make_call(CASES[name])
    case = CASES[name]
    model = eager_output(
        call.query,
        call.key,
        call.value,
        call.mask,
        scaling=SCALING * 1.1,
        softcap=case.softcap,
        sinks=call.sinks,
    )
    error = _raises_for_layer(Certifier((LAYER,), "float32"), dataclasses.replace(call, output=model), pads)
    assert "attention output" in error.message


@pytest.mark.parametrize("name", ["gqa", "sinks"])
def test_fails_when_the_mask_hides_a_key_the_model_attended_to(name: str) -> None:
    call, pads = make_call(CASES[name])
    assert call.mask is not None and call.mask.dtype == torch.bool
    mask = call.mask.clone()
    b, pad = 1, PADS[1]
    assert mask[b, 0, LENGTH - 1, pad + 1]  # the last row of sequence 1 attended to its second key
    mask[b, 0, :, pad + 1] = False
    error = _raises_for_layer(Certifier((LAYER,), "float32"), dataclasses.replace(call, mask=mask), pads)
    assert "attention output" in error.message


def test_fails_when_the_probabilities_ignore_the_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row-sum check on its own: probabilities that drop the sink (and an output that agrees with
    them) are caught by the sink mass the certifier computes independently."""

    def no_sinks(*args: object, sinks: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        return attention_probs(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(certify, "attention_probs", no_sinks)
    call = _without_sinks(CASES["sinks"])
    assert call.sinks is not None
    error = _raises_for_layer(Certifier((LAYER,), "float32"), call, PADS)
    assert "rows sum to 1" in error.message and "attention output" not in error.message
    assert error.detail["row_sum_error"] > ROW_SUM_TOLERANCE


def test_fails_when_probability_lands_on_hidden_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    def leaky(*args: object, allowed: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        assert allowed is not None
        leak = ~allowed.clone()
        leak[..., :-1] = False  # the last column: the future for every sampled row but the last
        return attention_probs(*args, allowed=allowed | leak, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(certify, "attention_probs", leaky)
    call, pads = make_call(CASES["gqa"])
    error = _raises_for_layer(Certifier((LAYER,), "float32"), call, pads)
    assert "mask hides" in error.message and error.detail["masked_mass"] > 0


def test_due_once_per_layer_and_phase() -> None:
    certifier = Certifier((1, 3), "bfloat16")
    assert certifier.due(1, 12)  # prefill
    assert not certifier.due(1, 12)
    assert not certifier.due(1, 5)  # a second prefill chunk of the same layer
    assert certifier.due(1, 1)  # first decode call
    assert not certifier.due(1, 1)
    assert certifier.due(3, 1) and certifier.due(3, 7)
    assert not certifier.due(3, 7) and not certifier.due(3, 1)
    for q_len in (12, 1):
        assert not certifier.due(0, q_len) and not certifier.due(2, q_len)  # not exported
    assert certifier.output_tolerance == OUTPUT_TOLERANCE["bfloat16"]
    assert Certifier((1,), "float16").output_tolerance == OUTPUT_TOLERANCE["float16"]


def test_a_bulk_jobs_micro_batches_check_the_layers_in_turn() -> None:
    layers = tuple(range(32))
    assert micro_batch_layers(layers, 0) == layers  # the first micro-batch checks every layer
    turn = [micro_batch_layers(layers, k) for k in range(1, MICRO_BATCH_LAYER_STRIDE + 1)]
    assert sorted(sum(turn, ())) == list(layers)  # then each one once in the next STRIDE
    assert {len(checked) for checked in turn} == {32 // MICRO_BATCH_LAYER_STRIDE}
    assert micro_batch_layers(layers, MICRO_BATCH_LAYER_STRIDE + 1) == turn[0]
    few = (2, 5, 7)  # fewer layers than the stride: one a micro-batch, none skipped
    assert [micro_batch_layers(few, k) for k in range(1, 5)] == [(2,), (5,), (7,), (2,)]
    assert micro_batch_layers((), 3) == ()


def test_call_without_output_is_not_checked() -> None:
    call, pads = make_call(CASES["plain"])
    certifier = Certifier((LAYER,), "float32")
    assert certify_prefill(certifier, dataclasses.replace(call, output=None), pads)
    assert certifier.certificate()["layers"] == {}


def test_fails_when_the_model_soft_capped_and_the_call_does_not_say() -> None:
    call, pads = make_call(CASES["softcap"])
    assert call.softcap is not None
    error = _raises_for_layer(Certifier((LAYER,), "float32"), dataclasses.replace(call, softcap=None), pads)
    assert "attention output" in error.message


def test_a_call_checks_a_sample_of_its_sequences_with_both_padding_extremes() -> None:
    """Up to SAMPLE_SEQUENCES active sequences are all checked; of more, the most and the least
    padded and others spread over the batch, never an inactive one."""
    pads = [5, 0, 9, 3, 3, 7, 1, 2, 6, 4]
    active = [True] * len(pads)
    chosen = Certifier.sequences(pads, active)
    assert len(chosen) == certify.SAMPLE_SEQUENCES
    assert {2, 1} <= chosen  # pad 9 and pad 0
    active[2] = False
    chosen = Certifier.sequences(pads, active)
    assert len(chosen) == certify.SAMPLE_SEQUENCES and 2 not in chosen and {5, 1} <= chosen
    assert Certifier.sequences([4, 0, 2], [True, False, True]) == {0, 2}
    same = Certifier.sequences([0] * 9, [True] * 9)  # equal pads: the spacing fills the sample
    assert len(same) == certify.SAMPLE_SEQUENCES and {0, 8} <= same


@pytest.mark.parametrize("name", list(CASES))
def test_sequences_checked_together_give_the_figures_of_each_alone(name: str) -> None:
    """One computation for every sequence (the session's way) measures what checking them one by
    one does: the other sequences' rows and keys, and each one's padding, change nothing."""
    call, pads = make_call(CASES[name])
    alone, together = Certifier((LAYER,), "float32"), Certifier((LAYER,), "float32")
    for b, pad in enumerate(pads):
        alone.check(call, b, pad, pad, 0, 0)
    together.check_sequences(call, [(b, pad, pad, (0, 0)) for b, pad in enumerate(pads)], 0, 0)
    one_by_one, at_once = alone.certificate()["layers"], together.certificate()["layers"]
    assert {k: v for k, v in at_once[str(LAYER)].items() if k in ("rows", "calls")} == {
        k: v for k, v in one_by_one[str(LAYER)].items() if k in ("rows", "calls")
    }
    for figure in ("row_sum_error", "masked_mass", "output_error"):
        assert at_once[str(LAYER)][figure] == pytest.approx(
            one_by_one[str(LAYER)][figure], rel=1e-4, abs=1e-7
        )
