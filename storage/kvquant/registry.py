"""The compressed KV methods, each declared once: name, bit widths, parameters, accounting and reader.

A method is one :class:`KVMethodDef` registered with :func:`register` (numpy only, so the API's
spec validation and estimate, and a researcher's :class:`~storage.kvquant.reader.KVBundle`, need no
torch); its torch codec (encoder, the dequantised cache the fidelity report scores, the generation
check's round trip) is registered under the same name with ``worker.kvexport.register_codec``.
Everything else looks the method up by name:

- ``storage.kvquant.spec``: which names, bit widths and method parameters a job spec may give;
- ``storage.jobs.estimate``: theoretical bits of the codes plus the group-wide arrays;
- ``worker.kvexport``: the group-wide arrays written next to the codes, the theoretical ratio;
- ``storage.kvquant.reader``: dequantisation and score estimation of a stored cell.

Built-in methods live in :mod:`storage.kvquant.methods` (one module per family), loaded on the first
lookup. Adding a method: one module that builds its ``KVMethodDef`` and calls :func:`register`
(built-ins: import it in ``storage/kvquant/methods/__init__.py``), plus its torch codec.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from storage.kvquant.spec import KVMethodSpec

# name → (dims, data) of one array of a ``kv/<method>_<bits>`` group
GroupArrays = dict[str, tuple[tuple[str, ...], np.ndarray]]


@dataclass(frozen=True)
class StoredCell:
    """One (layer, sequence) of a stored ``kv/<method>_<bits>`` group, as the reader hands it to a
    method: its ``k_*`` and ``v_*`` arrays (prefix removed, ``[kv_head, ...]``, padded along the
    token axis to the longest sequence), the group-wide arrays by name, the sequence length and
    the head size."""

    k: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    shared: Callable[[str], np.ndarray]
    length: int
    dim: int


def _no_arrays(method: KVMethodSpec, dim: int) -> GroupArrays:
    return {}


def _no_bytes(method: KVMethodSpec, dim: int) -> int:
    return 0


@dataclass(frozen=True)
class KVMethodDef:
    """The numpy-side facts of one compressed KV method.

    ``job_bits(method, dim, lengths)``: theoretical bits of one kv head's K and V over sequences of
    ``lengths`` tokens (the theoretical ratio and the estimate). ``shared_arrays(method, dim)``: the
    group-wide arrays stored once next to the codes (matrices, codebooks); ``shared_bytes`` what
    the estimate counts for them. ``dequantize(method, cell)`` → float32 ``(k̂, v̂) [kv_head, T, D]``
    of one stored cell; ``scores(method, cell, q, k̂)`` → estimated ``q·k [kv_head, Nq, T]`` when
    the method has a better estimator than ``q @ k̂ᵀ`` (None: that product)."""

    name: str
    label: str  # how errors and docs name it ("KIVI")
    bits: tuple[int, ...]  # allowed bit widths
    job_bits: Callable[[KVMethodSpec, int, Sequence[int]], float]
    dequantize: Callable[[KVMethodSpec, StoredCell], tuple[np.ndarray, np.ndarray]]
    params: tuple[str, ...] = ()  # which of kvspec.METHOD_PARAMS it uses
    shared_arrays: Callable[[KVMethodSpec, int], GroupArrays] = _no_arrays
    shared_bytes: Callable[[KVMethodSpec, int], int] = _no_bytes
    scores: Callable[[KVMethodSpec, StoredCell, np.ndarray, np.ndarray], np.ndarray] | None = None


_METHODS: dict[str, KVMethodDef] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from storage.kvquant import methods  # noqa: F401  (registers the built-in methods)


def register(definition: KVMethodDef) -> KVMethodDef:
    """Add a method; its name must be new."""
    if definition.name in _METHODS:
        raise ValueError(f"KV method {definition.name!r} is already registered")
    if not definition.bits:
        raise ValueError(f"KV method {definition.name!r} allows no bit width")
    _METHODS[definition.name] = definition
    return definition


def unregister(name: str) -> None:
    """Remove a method (tests registering a toy one)."""
    del _METHODS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    _load_builtins()
    return tuple(_METHODS)


def kv_method(name: str) -> KVMethodDef:
    """The declaration of method ``name``."""
    _load_builtins()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown KV method {name!r}; known: {', '.join(_METHODS)}") from None
