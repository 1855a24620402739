"""Pattern labels (rule order, thresholds, undetermined) and per-kv-head means."""

from __future__ import annotations

import numpy as np
import pytest

from storage.bundle.labels import LABEL_METRICS, LABELS, SummaryParams, kv_head_mean, label_heads

BASE = {  # a "mixed" head: no rule matches
    "entropy_norm": 0.5,
    "prev": 0.05,
    "prev_argmax_rate": 0.1,
    "sink": 0.4,
    "local": 0.3,
    "middle": 0.3,
    "middle_k90": 100.0,
}


def _label(metrics: dict[str, float], params: SummaryParams | None = None, rows: int = 10) -> str:
    means = {name: np.array([value]) for name, value in {**BASE, **metrics}.items()}
    return str(label_heads(means, np.array([rows]), params or SummaryParams())[0])


@pytest.mark.parametrize(
    ("metrics", "label"),
    [
        ({}, "mixed"),
        ({"entropy_norm": 0.9}, "uniform"),
        ({"prev": 0.45}, "previous_token"),
        ({"prev_argmax_rate": 0.95}, "previous_token"),
        ({"sink": 0.85, "local": 0.1, "middle": 0.05}, "sink"),
        ({"sink": 0.05, "local": 0.85, "middle": 0.1}, "local"),
        ({"sink": 0.5, "local": 0.45, "middle": 0.05}, "streaming"),
        ({"sink": 0.2, "local": 0.2, "middle": 0.6, "middle_k90": 5.0}, "retrieval_candidate"),
        ({"sink": 0.2, "local": 0.2, "middle": 0.6, "middle_k90": 16.0}, "retrieval_candidate"),
        ({"sink": 0.2, "local": 0.2, "middle": 0.6, "middle_k90": 16.5}, "scattered"),
    ],
)
def test_each_rule(metrics: dict[str, float], label: str) -> None:
    assert _label(metrics) == label


@pytest.mark.parametrize(
    ("metrics", "label"),
    [  # each head meets two rules: the first in spec order wins
        ({"entropy_norm": 0.9, "prev": 0.5}, "uniform"),
        ({"prev": 0.5, "sink": 0.9, "local": 0.05, "middle": 0.05}, "previous_token"),
        ({"prev_argmax_rate": 1.0, "local": 0.9, "sink": 0.05, "middle": 0.05}, "previous_token"),
        ({"sink": 0.8, "local": 0.15, "middle": 0.05}, "sink"),  # also streaming
        ({"sink": 0.1, "local": 0.85, "middle": 0.05}, "local"),  # also streaming
        ({"entropy_norm": 0.86, "middle": 0.9, "sink": 0.05, "local": 0.05}, "uniform"),  # also scattered
    ],
)
def test_first_matching_rule_wins(metrics: dict[str, float], label: str) -> None:
    assert _label(metrics) == label


def test_custom_thresholds_change_labels() -> None:
    sinkish = {"sink": 0.75, "local": 0.2, "middle": 0.05}
    assert _label(sinkish) == "streaming"
    assert _label(sinkish, SummaryParams(sink_mass=0.7)) == "sink"
    retrieval = {"sink": 0.2, "local": 0.2, "middle": 0.6, "middle_k90": 12.0}
    assert _label(retrieval) == "retrieval_candidate"
    assert _label(retrieval, SummaryParams(retrieval_middle_k90_max=8)) == "scattered"
    assert _label(retrieval, SummaryParams(middle_mass=0.7)) == "mixed"
    assert _label({}, SummaryParams(uniform_entropy_norm=0.4)) == "uniform"
    assert _label({}, SummaryParams(previous_token_argmax_rate=0.1)) == "previous_token"


def test_no_rows_or_nan_is_undetermined() -> None:
    assert _label({"entropy_norm": 0.99}, rows=0) == "undetermined"
    assert _label({"entropy_norm": float("nan")}) == "undetermined"


def test_labels_broadcast_over_layers_sequences_heads() -> None:
    shape = (2, 3, 4)  # [L, B, H]
    means = {name: np.full(shape, BASE[name]) for name in LABEL_METRICS}
    means["entropy_norm"][0, :, 1] = 0.95
    means["sink"][1, :, 2], means["middle"][1, :, 2] = 0.9, 0.0
    rows = np.array([[5, 0, 7], [1, 2, 0]])[..., None]  # [L, B, 1]
    labels = label_heads(means, rows, SummaryParams())
    assert labels.shape == shape and set(np.unique(labels)) <= set(LABELS)
    assert (labels[0, 1] == "undetermined").all() and (labels[1, 2] == "undetermined").all()
    assert labels[0, 0].tolist() == ["mixed", "uniform", "mixed", "mixed"]
    assert labels[1, 1].tolist() == ["mixed", "mixed", "sink", "mixed"]
    pooled = label_heads({k: v[:, 0] for k, v in means.items()}, np.array([[12], [3]]), SummaryParams())
    assert pooled.shape == (2, 4) and pooled[0, 1] == "uniform"


def test_label_heads_names_missing_metrics() -> None:
    with pytest.raises(KeyError, match="middle_k90"):
        label_heads({k: np.zeros(1) for k in LABEL_METRICS if k != "middle_k90"}, np.ones(1), SummaryParams())


def test_kv_head_mean_all_heads_gqa() -> None:
    values = np.arange(2 * 8, dtype=np.float64).reshape(2, 8)  # [L, H=8], 2 kv heads → groups of 4
    out = kv_head_mean(values, num_kv_heads=2)
    assert out.kv_heads.tolist() == [0, 1]
    np.testing.assert_allclose(out.values, [[1.5, 5.5], [9.5, 13.5]])
    mean, kv = kv_head_mean(values, 8)  # MHA: identity; unpacks as a tuple
    np.testing.assert_array_equal(mean, values)
    np.testing.assert_array_equal(kv, np.arange(8))


def test_kv_head_mean_head_subset() -> None:
    # model: 12 query heads, 4 kv heads (groups of 3); exported query heads 1, 2, 7, 10, 11
    heads = [1, 2, 7, 10, 11]
    values = np.array([[[10.0, 20.0, 30.0, 40.0, 60.0]], [[np.nan, np.nan, 1.0, 2.0, 3.0]]])  # [L=2, B=1, 5]
    out = kv_head_mean(values, 4, heads, num_heads=12)
    assert out.kv_heads.tolist() == [0, 2, 3]  # kv head 1 (query heads 3..5) is read by no exported head
    assert out.values.shape == (2, 1, 3)
    np.testing.assert_allclose(out.values[0, 0], [15.0, 30.0, 50.0])
    assert np.isnan(out.values[1, 0, 0]) and out.values[1, 0, 1:].tolist() == [1.0, 2.5]


def test_kv_head_mean_validates() -> None:
    values = np.zeros((2, 3))
    with pytest.raises(ValueError, match="num_heads"):
        kv_head_mean(values, 2, [0, 1, 2])
    with pytest.raises(ValueError, match="multiple"):
        kv_head_mean(values, 2)
    with pytest.raises(ValueError, match="lie in"):
        kv_head_mean(values, 2, [0, 1, 8], num_heads=8)
    with pytest.raises(ValueError, match="3 head indices"):
        kv_head_mean(np.zeros((2, 4)), 2, [0, 1, 2], num_heads=8)
