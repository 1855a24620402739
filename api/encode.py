"""Binary bodies of the slice and tile routes: ``.npy`` files and RGBA PNG images (numpy and the
standard library: zlib, struct, crc32)."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np

__all__ = [
    "NPY_MEDIA_TYPE",
    "PNG_MEDIA_TYPE",
    "VIRIDIS_ANCHORS",
    "colormap_rgba",
    "json_values",
    "npy_bytes",
    "png_rgba",
]

NPY_MEDIA_TYPE = "application/x-npy"
PNG_MEDIA_TYPE = "image/png"
# viridis at nine evenly spaced points of 0..1 (sRGB); the colormap interpolates between them
VIRIDIS_ANCHORS: tuple[tuple[int, int, int], ...] = (
    (68, 1, 84),
    (71, 44, 122),
    (59, 81, 139),
    (44, 113, 142),
    (33, 144, 141),
    (39, 173, 129),
    (92, 200, 99),
    (170, 220, 50),
    (253, 231, 37),
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file (``numpy.load`` reads it; never pickled)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def json_values(array: np.ndarray) -> Any:
    """``array`` as nested lists for JSON: NaN and ±inf (which JSON cannot hold) become null."""
    if array.dtype.kind == "f":
        values = array.astype(np.float64)
        out = values.astype(object)
        out[~np.isfinite(values)] = None
        return out.tolist()
    return array.tolist()


def _lookup_table() -> np.ndarray:
    anchors = np.asarray(VIRIDIS_ANCHORS, dtype=np.float64)
    where = np.linspace(0.0, 1.0, len(anchors))
    levels = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(levels, where, anchors[:, c]) for c in range(3)], axis=-1)
    return np.rint(table).astype(np.uint8)


def colormap_rgba(values: np.ndarray) -> np.ndarray:
    """``values [h, w]`` over 0..1 (clipped) → ``[h, w, 4]`` uint8 RGBA, viridis-like; NaN (outside
    the matrix) fully transparent."""
    finite = np.isfinite(values)
    index = np.rint(np.clip(np.where(finite, values, 0.0), 0.0, 1.0) * 255).astype(np.intp)
    rgba = np.empty((*values.shape, 4), dtype=np.uint8)
    rgba[..., :3] = _lookup_table()[index]
    rgba[..., 3] = np.where(finite, 255, 0)
    return rgba


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_rgba(rgba: np.ndarray) -> bytes:
    """An 8-bit RGBA PNG of ``rgba [h, w, 4]`` uint8 (filter 0 on every row, zlib level 6)."""
    height, width, channels = rgba.shape
    if channels != 4 or rgba.dtype != np.uint8:
        raise ValueError(f"expected [h, w, 4] uint8, got {rgba.shape} {rgba.dtype}")
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), rgba.reshape(height, width * 4)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8 bits, colour type 6: RGBA
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )
