"""Selectors of a bundle slice, as the REST API and notebooks write them (numpy only).

A selector picks along one dimension of an array: ``"3"`` one index (the dimension is dropped) or
``"a:b"`` a half-open range, either side optional (``":8"``, ``"16:"``, ``":"``). Along the
coordinate dimensions ``layer``, ``head`` and ``kv_head`` the numbers are the model's real indices
(the values of the coordinate arrays: ``layer=15`` is the model's layer 15, wherever it lies among
the exported layers; a range keeps the exported ones in ``[a, b)``); along every other dimension
they are positions (``query=0:256``). Negative numbers are refused: say what you mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from storage.errors import QkvaultError

__all__ = [
    "COORDINATE_DIMS",
    "ArrayNotFound",
    "NotInBundle",
    "Pick",
    "Selector",
    "SliceError",
    "parse_selector",
    "resolve",
]

# Dimensions selected by the model's real index (the bundle's coordinate array of the same name).
COORDINATE_DIMS = ("layer", "head", "kv_head")

_INDEX = re.compile(r"^\s*(\d+)\s*$")
_RANGE = re.compile(r"^\s*(\d*)\s*:\s*(\d*)\s*$")


class SliceError(QkvaultError, ValueError):
    """A selector that does not fit the array: an unknown dimension, a malformed selector, an index
    out of range. The message names the dimension, what it holds and how to ask."""

    problem_type = "invalid-slice"
    status = 422


class ArrayNotFound(QkvaultError, KeyError):
    """The bundle has no array of that name (the message lists the ones it has)."""

    problem_type = "array-not-found"
    status = 404

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class NotInBundle(QkvaultError, LookupError):
    """A layer, head, sequence or tile the bundle does not have (the message names what it has)."""

    problem_type = "not-in-bundle"
    status = 404


@dataclass(frozen=True)
class Selector:
    """One dimension's selector: ``index`` (one, the dimension dropped) or ``[start, stop)``."""

    index: int | None = None
    start: int | None = None
    stop: int | None = None

    @property
    def is_index(self) -> bool:
        return self.index is not None

    def __str__(self) -> str:
        if self.index is not None:
            return str(self.index)
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


@dataclass(frozen=True)
class Pick:
    """A resolved selector: ``positions`` along the array's axis, contiguous ``[start, stop)``;
    ``drop``: an integer selector (the axis is removed from the result)."""

    start: int
    stop: int
    drop: bool

    @property
    def size(self) -> int:
        return self.stop - self.start

    def key(self) -> int | slice:
        return self.start if self.drop else slice(self.start, self.stop)


def parse_selector(dim: str, text: str) -> Selector:
    """``"3"`` → one index; ``"a:b"`` / ``":b"`` / ``"a:"`` / ``":"`` → a half-open range."""
    if match := _INDEX.match(text):
        return Selector(index=int(match.group(1)))
    if match := _RANGE.match(text):
        start, stop = (int(g) if g else None for g in match.groups())
        if start is not None and stop is not None and stop < start:
            raise SliceError(f"{dim}={text}: the range ends before it starts; write {dim}=a:b with a <= b")
        return Selector(start=start, stop=stop)
    raise SliceError(
        f"{dim}={text!r} is not a selector: write one non-negative index ({dim}=3) or a half-open "
        f"range ({dim}=0:16, {dim}=:16, {dim}=16:)"
    )


def resolve(dim: str, selector: Selector, size: int, coordinate: np.ndarray | None = None) -> Pick:
    """``selector`` along an axis of ``size`` positions. With ``coordinate`` (the real indices of a
    coordinate dimension, ascending), its numbers are those indices."""
    if coordinate is not None:
        values = [int(v) for v in coordinate]
        if selector.index is not None:
            if selector.index not in values:
                raise SliceError(
                    f"{dim} {selector.index} was not exported; exported {dim}s: {_listing(values)}"
                )
            position = values.index(selector.index)
            return Pick(position, position + 1, drop=True)
        low = 0 if selector.start is None else int(np.searchsorted(values, selector.start, side="left"))
        high = (
            len(values) if selector.stop is None else int(np.searchsorted(values, selector.stop, side="left"))
        )
        return Pick(low, max(low, high), drop=False)
    if selector.index is not None:
        if selector.index >= size:
            raise SliceError(
                f"{dim}={selector.index} is out of range: {dim} has {size} entries (0..{size - 1})"
            )
        return Pick(selector.index, selector.index + 1, drop=True)
    start = 0 if selector.start is None else selector.start
    stop = size if selector.stop is None else selector.stop
    if start > size or stop > size:
        raise SliceError(f"{dim}={selector} is out of range: {dim} has {size} entries (0..{size - 1})")
    return Pick(start, stop, drop=False)


def _listing(values: list[int]) -> str:
    return ", ".join(map(str, values[:32])) + (f" ... ({len(values)} in all)" if len(values) > 32 else "")
