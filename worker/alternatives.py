"""Token alternatives: the top-k of the model's next-token distribution at each position."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class AlternativesCollector:
    """Top-k token ids and log-probabilities (raw model distribution: log-softmax of the logits,
    before temperature / top-k / top-p) for the token at each position, and the log-probability of
    the token actually there. Position ``p``'s entry comes from the logits after reading tokens
    ``< p``, so position 0 (nothing read yet) has none."""

    def __init__(self, batch: int, positions: int, k: int) -> None:
        self.k = k
        self.ids = np.full((batch, positions, k), -1, dtype=np.int32)
        self.logprobs = np.full((batch, positions, k), np.nan, dtype=np.float32)
        self.chosen = np.full((batch, positions), np.nan, dtype=np.float32)

    def record(self, b: int, positions: torch.Tensor, logits: torch.Tensor, actual: torch.Tensor) -> None:
        """``logits [n, V]`` predicting the tokens ``actual [n]`` at ``positions [n]`` of sequence b."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(logprobs, min(self.k, logprobs.shape[-1]), dim=-1)
        chosen = logprobs.gather(-1, actual.long()[:, None])[:, 0]
        pos = positions.cpu().numpy()
        self.ids[b, pos, : top.indices.shape[1]] = top.indices.cpu().numpy()
        self.logprobs[b, pos, : top.values.shape[1]] = top.values.cpu().numpy()
        self.chosen[b, pos] = chosen.cpu().numpy()

    def arrays(self, tokenizer: Any) -> dict[str, np.ndarray]:
        unique = np.unique(self.ids[self.ids >= 0])
        strings = {int(i): tokenizer.decode([int(i)]) for i in unique}
        tokens = np.full(self.ids.shape, "", dtype=object)
        for index in np.argwhere(self.ids >= 0):
            tokens[tuple(index)] = strings[int(self.ids[tuple(index)])]
        return {
            "topk_ids": self.ids,
            "topk_logprobs": self.logprobs,
            "topk_tokens": tokens,
            "logprob": self.chosen,
        }
