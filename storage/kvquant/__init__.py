"""Compressed KV export formats: TurboQuant (MSE and inner-product) and the KIVI baseline.

numpy only, so a researcher can dequantise an exported cache in Jupyter without torch; the torch
encoders that produce these arrays on the worker's device live in ``worker.kvquant``. Modules:

- :mod:`~storage.kvquant.codebook` — Lloyd–Max codebooks and their distortion (computed on demand, cached);
- :mod:`~storage.kvquant.rotation` — the seeded rotation ``Π`` and QJL matrix ``S``;
- :mod:`~storage.kvquant.bitpack` — little-endian bit packing of codes along the last axis;
- :mod:`~storage.kvquant.turboquant` — TurboQuant encode/decode and the inner-product estimator;
- :mod:`~storage.kvquant.kivi` — KIVI encode/decode;
- :mod:`~storage.kvquant.accounting` — theoretical bits per vector and ratios against fp16;
- :mod:`~storage.kvquant.registry` — the ``kv_compression`` methods, each declared once (name, bit
  widths, parameters, accounting, reader); the built-ins are in :mod:`~storage.kvquant.methods`;
- :mod:`~storage.kvquant.reader` — ``KVBundle``, a bundle's compressed groups read back.
"""

from __future__ import annotations

from storage.kvquant.accounting import payload_nbytes, theoretical_bits_per_vector, theoretical_ratio
from storage.kvquant.bitpack import pack_bits, packed_size, unpack_bits
from storage.kvquant.codebook import distortion_bound, expected_distortion, lloyd_max_codebook, midpoints
from storage.kvquant.kivi import (
    kivi_decode_keys,
    kivi_decode_values,
    kivi_encode_keys,
    kivi_encode_values,
    quantized_tokens,
)
from storage.kvquant.rotation import qjl_matrix, rotation_matrix
from storage.kvquant.turboquant import (
    QJL_SCALE,
    mse_decode,
    mse_encode,
    prod_decode,
    prod_dequantize,
    prod_encode,
    prod_inner_product,
    prod_scores,
)

__all__ = [
    "QJL_SCALE",
    "distortion_bound",
    "expected_distortion",
    "kivi_decode_keys",
    "kivi_decode_values",
    "kivi_encode_keys",
    "kivi_encode_values",
    "lloyd_max_codebook",
    "midpoints",
    "mse_decode",
    "mse_encode",
    "pack_bits",
    "packed_size",
    "payload_nbytes",
    "prod_decode",
    "prod_dequantize",
    "prod_encode",
    "prod_inner_product",
    "prod_scores",
    "qjl_matrix",
    "quantized_tokens",
    "rotation_matrix",
    "theoretical_bits_per_vector",
    "theoretical_ratio",
    "unpack_bits",
]
