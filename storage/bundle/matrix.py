"""One attention matrix of a bundle, ``(layer, head, sequence)``, as a tile pyramid reads it
(numpy + zarr).

Rows are queries and columns keys, both the sequence's real tokens (positions ``0 .. length - 1``:
a bundle stores each sequence from position 0, padding past its length). A materialised bundle is
read from the chunks of ``attention`` a block touches; a derived-attention bundle's block is
computed from ``q`` and ``k`` (:class:`storage.bundle.attention.DerivedAttention`, numpy).
Attention is causal: keys after a row's own position are zero, which :meth:`AttentionMatrix.read`
callers may rely on to skip the upper triangle.
"""

from __future__ import annotations

import numpy as np
import zarr

from storage.bundle.reader import open_group
from storage.bundle.selectors import NotInBundle, SliceError
from storage.bundle.slices import BundleView

__all__ = ["AttentionMatrix"]


def _position(values: np.ndarray, value: int, what: str) -> int:
    listed = [int(v) for v in values]
    if value not in listed:
        raise NotInBundle(f"{what} {value} was not exported; exported {what}s: {', '.join(map(str, listed))}")
    return listed.index(value)


def _values(group: zarr.Group, name: str) -> np.ndarray:
    array = group[name]
    assert isinstance(array, zarr.Array)
    return np.asarray(array[...])


class AttentionMatrix:
    """``tokens × tokens`` float32 probabilities of the model's ``layer`` and query ``head`` (real
    indices) for sequence ``seq`` (job-wide for a bulk job). :meth:`read` reads one block."""

    def __init__(self, view: BundleView, layer: int, head: int, seq: int) -> None:
        if not 0 <= seq < max(view.sequences, 0):
            raise NotInBundle(
                f"sequence {seq} is not in this bundle: it holds sequences 0..{view.sequences - 1}"
            )
        ref = view.locate(seq)
        self.view, self.layer, self.head, self.seq = view, layer, head, seq
        self.tokens = ref.length
        self.slot = ref.slot
        self.group_path = ref.group
        group = view.group(ref.group)
        self.layer_pos = _position(_values(group, "layer"), layer, "layer")
        self.derived = view.derived(ref.group) and "attention" not in group
        if self.derived:
            from storage.bundle.attention import DerivedAttention

            ds = open_group(view.location, ref.group or None, view.storage_options)
            self._source = DerivedAttention(ds, backend="numpy")
            self.head_pos = _position(_values(group, "head"), head, "head")
            return
        if "attention" not in group:
            raise NotInBundle("this bundle has no attention (captured with attention=false)")
        if "query_position" in group:
            raise SliceError(
                "tiles need every query row, and this bundle stored selected rows only "
                "(capture.query_rows / generation_steps): read them with GET /v1/jobs/{id}/arrays/attention"
            )
        array = group["attention"]
        assert isinstance(array, zarr.Array)
        self._array = array
        dims = tuple(array.metadata.dimension_names or ())  # type: ignore[union-attr]
        if "top_head" in dims:
            kept = _values(group, "top_head_index")[self.layer_pos]
            self.head_pos = _position(kept, head, f"head of layer {layer} kept (top_heads);")
        else:
            self.head_pos = _position(_values(group, "head"), head, "head")

    def read(self, row_start: int, row_stop: int, col_start: int, col_stop: int) -> np.ndarray:
        """Probabilities ``[row_stop - row_start, col_stop - col_start]`` float32 (inside the matrix)."""
        if self.derived:
            rows = np.arange(row_start, row_stop)
            cols = np.arange(col_start, col_stop)
            block: np.ndarray = self._source.compute(
                self.layer_pos, self.slot, np.asarray([self.head_pos]), rows, cols
            )[0]
            return block
        key = (
            self.layer_pos,
            self.slot,
            self.head_pos,
            slice(row_start, row_stop),
            slice(col_start, col_stop),
        )
        return np.asarray(self._array[key], dtype=np.float32)
