"""Micro-batches of a bulk job: sequences grouped by length under a token budget.

A bulk job streams its sequences (prompt tokens + new tokens each) from its source; padding every
sequence of a dataset to the longest one would waste most of the GPU time on a realistic length
mix. :func:`plan_microbatches` reads the lengths in windows of ``window`` sequences, sorts each
window by length and cuts it into micro-batches whose padded size, ``len(batch) × longest``,
stays within ``token_budget`` tokens and whose padding stays within ``max_padding`` of it, so
sequences of one micro-batch have nearly the same length.

The plan is a pure function of the lengths in source order and the three parameters: a resumed
attempt recomputes the same micro-batches and skips the ones already stored. Memory holds one
window of lengths, never the whole source.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = ["MicroBatch", "PaddingTally", "cut_window", "plan_microbatches"]

DEFAULT_WINDOW = 4096
DEFAULT_MAX_PADDING = 0.05


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: ``sequences`` (indices in source order, longest first) with their lengths
    in tokens (prompt + new tokens)."""

    index: int
    sequences: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def padded_tokens(self) -> int:
        """Tokens the forward pass computes: every sequence padded to the longest."""
        return len(self.lengths) * max(self.lengths)


@dataclass
class PaddingTally:
    """Tokens and padded tokens over micro-batches: ``fraction`` is the share of padding."""

    tokens: int = 0
    padded_tokens: int = 0

    def add(self, batch: MicroBatch) -> None:
        self.tokens += batch.tokens
        self.padded_tokens += batch.padded_tokens

    @property
    def fraction(self) -> float:
        return 0.0 if not self.padded_tokens else 1.0 - self.tokens / self.padded_tokens


def plan_microbatches(
    lengths: Iterable[int],
    *,
    token_budget: int,
    max_sequences: int,
    max_padding: float = DEFAULT_MAX_PADDING,
    window: int = DEFAULT_WINDOW,
) -> Iterator[MicroBatch]:
    """Micro-batches of the sequences whose lengths (in tokens, source order) are ``lengths``.

    Each micro-batch holds at most ``max_sequences`` sequences and ``token_budget`` padded tokens,
    of which at most a ``max_padding`` share is padding (so the whole job's padding is at most
    that); a sequence longer than the budget is a micro-batch of its own (admission refuses those
    that do not fit the model). Within a window, longer sequences come first (ties: source order)."""
    if token_budget < 1 or max_sequences < 1 or window < 1 or not 0 <= max_padding < 1:
        raise ValueError("token_budget, max_sequences and window must be positive, max_padding in [0, 1)")
    index = 0
    pending: list[tuple[int, int]] = []
    for position, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"sequence {position} has {length} tokens: every sequence needs one")
        pending.append((position, length))
        if len(pending) == window:
            for batch in cut_window(pending, token_budget, max_sequences, index, max_padding):
                index += 1
                yield batch
            pending = []
    yield from cut_window(pending, token_budget, max_sequences, index, max_padding)


def cut_window(
    window: list[tuple[int, int]],
    budget: int,
    max_sequences: int,
    first: int,
    max_padding: float = DEFAULT_MAX_PADDING,
) -> Iterator[MicroBatch]:
    """The micro-batches of one window of ``(sequence, length)`` pairs, numbered from ``first``
    (:func:`plan_microbatches` applies it to each window of a stream)."""
    ordered = sorted(window, key=lambda item: (-item[1], item[0]))
    index, start = first, 0
    while start < len(ordered):
        longest = ordered[start][1]  # sorted: the first sequence of a micro-batch is its longest
        limit = min(max_sequences, max(1, budget // longest), len(ordered) - start)
        end, tokens = start + 1, longest
        while end - start < limit:
            size, length = end - start + 1, ordered[end][1]
            if (tokens + length) < (1 - max_padding) * size * longest:
                break  # one more (shorter) sequence would pad the micro-batch past max_padding
            end, tokens = end + 1, tokens + length
        chunk = ordered[start:end]
        yield MicroBatch(index, tuple(p for p, _ in chunk), tuple(n for _, n in chunk))
        index, start = index + 1, end
