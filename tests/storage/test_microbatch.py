"""storage/jobs/microbatch.py: every sequence once, budgets kept, the same plan every time, lengths
read one window at a time, and little padding on a realistic length mix."""

from __future__ import annotations

import importlib
import inspect
import itertools
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.jobs.microbatch import DEFAULT_MAX_PADDING, MicroBatch, PaddingTally, plan_microbatches

REPO = Path(__file__).resolve().parents[2]
STDLIB_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "configparser",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
)


def _corpus_lengths() -> list[int]:
    """Token lengths (about 4 characters a token) of real English text of varied length: every
    paragraph of this repository's docs and the docstrings of the Python standard library's modules,
    as a dataset of documents would have them, plus 32 new tokens each."""
    texts: list[str] = []
    for path in sorted((REPO / "docs").glob("*.md")):
        texts += [p for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if len(p) > 40]
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        for _, member in inspect.getmembers(module):
            doc = inspect.getdoc(member)
            if doc and len(doc) > 40:
                texts.append(doc)
                if inspect.isclass(member):
                    methods = (inspect.getdoc(m) for _, m in inspect.getmembers(member))
                    texts += [d for d in methods if d and len(d) > 40]
    unique = sorted(set(texts))  # each text once (inherited docstrings repeat)
    random.Random(0).shuffle(unique)  # a dataset's order: no relation to length
    return [max(1, len(text) // 4) + 32 for text in unique]


def _check(batches: list[MicroBatch], lengths: list[int], budget: int, max_sequences: int) -> None:
    seen = sorted(itertools.chain.from_iterable(b.sequences for b in batches))
    assert seen == list(range(len(lengths)))
    assert [b.index for b in batches] == list(range(len(batches)))
    for b in batches:
        assert [lengths[s] for s in b.sequences] == list(b.lengths)
        assert list(b.lengths) == sorted(b.lengths, reverse=True)
        assert len(b.sequences) <= max_sequences
        assert b.padded_tokens <= budget or len(b.sequences) == 1
        assert b.tokens >= (1 - DEFAULT_MAX_PADDING) * b.padded_tokens


def test_every_sequence_once_within_the_budgets() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 3000) for _ in range(5000)]
    batches = list(plan_microbatches(lengths, token_budget=8192, max_sequences=16, window=1000))
    _check(batches, lengths, 8192, 16)
    again = list(plan_microbatches(iter(lengths), token_budget=8192, max_sequences=16, window=1000))
    assert again == batches  # a resumed attempt plans the same micro-batches


def test_a_sequence_longer_than_the_budget_is_alone() -> None:
    batches = list(plan_microbatches([12, 9000, 12], token_budget=4096, max_sequences=8))
    assert [b.sequences for b in batches] == [(1,), (0, 2)]


def test_lengths_are_read_one_window_at_a_time() -> None:
    read = 0

    def lengths() -> Iterator[int]:
        nonlocal read
        for n in itertools.cycle([5, 50, 500]):
            read += 1
            yield n

    plan = plan_microbatches(lengths(), token_budget=1000, max_sequences=4, window=100)
    first = next(plan)
    assert first.index == 0 and read == 100  # one window, not the (endless) source


def test_bad_parameters_and_empty_sequences_are_refused() -> None:
    with pytest.raises(ValueError, match="max_padding in"):
        list(plan_microbatches([1], token_budget=10, max_sequences=1, max_padding=1.0))
    with pytest.raises(ValueError, match="positive"):
        list(plan_microbatches([1], token_budget=0, max_sequences=1))
    with pytest.raises(ValueError, match="sequence 1 has 0 tokens"):
        list(plan_microbatches([3, 0], token_budget=10, max_sequences=2))


def test_padding_on_a_real_text_length_mix_is_at_most_ten_percent() -> None:
    lengths = _corpus_lengths()
    assert len(lengths) > 1000 and max(lengths) > 20 * min(lengths)  # a real spread of lengths
    tally = PaddingTally()
    batches = list(plan_microbatches(lengths, token_budget=16384, max_sequences=64))
    for batch in batches:
        tally.add(batch)
    _check(batches, lengths, 16384, 64)
    assert tally.fraction <= 0.10, f"padding {tally.fraction:.1%} of {tally.padded_tokens} tokens"
    # padding every sequence to the longest, as one padded batch does, wastes most of the compute
    one_batch = 1 - sum(lengths) / (len(lengths) * max(lengths))
    assert one_batch > 0.8
