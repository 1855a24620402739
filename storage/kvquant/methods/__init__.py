"""The built-in compressed KV methods, one module per family, registered here in the order the job
spec's schema lists them (:mod:`storage.kvquant.registry` imports this package on its first
lookup). A new built-in method: its module, and one entry in ``BUILTIN``."""

from __future__ import annotations

from storage.kvquant.methods import kivi, turboquant
from storage.kvquant.registry import KVMethodDef, register

BUILTIN: tuple[KVMethodDef, ...] = (turboquant.TURBOQUANT_PROD, turboquant.TURBOQUANT_MSE, kivi.KIVI)

for _definition in BUILTIN:
    register(_definition)
