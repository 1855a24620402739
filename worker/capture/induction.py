"""Induction score (HEAD_METRICS.md, optional): attention on the token after the previous
occurrence, measured on a random token sequence shown twice."""

from __future__ import annotations

import numpy as np
import torch

from storage.jobs.capture import InductionProbeSpec


def probe_tokens(
    spec: InductionProbeSpec, vocab_size: int, special_ids: set[int], prefix: list[int]
) -> list[int]:
    """``prefix`` (e.g. BOS) + R + R with R ``spec.length`` random ordinary token ids (seeded)."""
    rng = np.random.default_rng(spec.seed)
    allowed = np.setdiff1d(
        np.arange(vocab_size), np.fromiter(special_ids, dtype=np.int64, count=len(special_ids))
    )
    chunk = rng.choice(allowed, size=spec.length, replace=False).tolist()
    return prefix + chunk + chunk


class InductionObserver:
    """A :class:`~worker.capture.session.RowObserver` for the probe: for each row at position p in
    the second copy (except its first token) sums the attention on key ``p - L + 1``."""

    def __init__(self, num_layers: int, num_heads: int, prefix_len: int, length: int) -> None:
        self.first_position = prefix_len + length + 1  # second copy's second token
        self.length = length
        self.sums = np.zeros((num_layers, num_heads), dtype=np.float64)
        self.rows = np.zeros(num_layers, dtype=np.int64)

    def observe(self, layer_pos: int, batch_index: int, probs: torch.Tensor, positions: torch.Tensor) -> None:
        keep = positions >= self.first_position
        if not bool(keep.any()):
            return
        rows = torch.nonzero(keep)[:, 0]
        targets = positions[rows] - self.length + 1
        picked = probs[:, rows.to(probs.device), targets.to(probs.device)]  # [H, n]
        self.sums[layer_pos] += picked.double().sum(dim=1).cpu().numpy()
        self.rows[layer_pos] += int(rows.numel())

    def scores(self) -> np.ndarray:
        """``[L, H]`` mean attention on the induction target."""
        with np.errstate(invalid="ignore"):
            return (self.sums / self.rows[:, None]).astype(np.float32)
