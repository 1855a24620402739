"""Exact quantiles of many short series at once, on the device the values live on.

:func:`linear_quantiles` is ``numpy.quantile(..., method="linear")`` of each row of a padded
``[..., R]`` tensor, every row with its own count of values: one sort along the last axis and two
gathers, instead of one numpy call per series on the host (the per-head summaries need three
quantiles of eight metrics for every (layer, sequence, head): 256 series per layer and sequence of
an 8B model).

Shapes: S series (any leading shape), R values per series at most, P quantiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.capture.hostcopy import to_device


def linear_quantiles(
    values: torch.Tensor, counts: torch.Tensor, quantiles: Sequence[float], *, inf_padded: bool = False
) -> torch.Tensor:
    """``numpy.quantile(v, quantiles, method="linear")`` of each series ``v = values[s][:counts[s]]``.

    ``values [S..., R]`` (float32 or float64; entries at or past a series' count are ignored,
    whatever they hold), ``counts [S...]`` (integer, broadcast against ``S...``) → ``[S..., P]``
    float64, NaN where a count is 0. The interpolation follows numpy's own formulas (virtual index
    ``(n - 1)·q``, ``a + (b - a)·γ`` below γ = 0.5 and ``b - (b - a)·(1 - γ)`` from it), so the
    figures equal numpy's on the same float64 values. Values must be finite (a NaN sorts past the
    padding). ``inf_padded``: every entry that is not one of a series' values is +inf already,
    wherever it lies (a series' values need not come first): they sort last, nothing is masked."""
    width = values.shape[-1]
    device = values.device
    counts = counts.to(device=device, dtype=torch.long)
    if width == 0:
        shape = (*values.shape[:-1], len(quantiles))
        return torch.full(shape, float("nan"), dtype=torch.float64, device=device)
    if not inf_padded:
        values = values.masked_fill(torch.arange(width, device=device) >= counts[..., None], float("inf"))
    ordered = values.sort(dim=-1).values.double()
    n = counts.double()[..., None]  # [S..., 1]
    q = to_device(torch.tensor(quantiles, dtype=torch.float64), device)  # [P]
    virtual = (n - 1.0) * q  # numpy's virtual index for "linear"
    previous = torch.floor(virtual)
    gamma = virtual - previous
    last = (counts - 1).clamp(min=0)[..., None]
    below = torch.minimum(previous.long().clamp(min=0), last)
    above = torch.minimum(below + 1, last)
    shape = (*ordered.shape[:-1], len(quantiles))  # gather does not broadcast its index
    low, high = ordered.gather(-1, below.expand(shape)), ordered.gather(-1, above.expand(shape))
    diff = high - low
    interpolated = torch.where(gamma >= 0.5, high - diff * (1.0 - gamma), low + diff * gamma)
    return interpolated.masked_fill((counts == 0)[..., None], float("nan"))
