"""Per-record norms as upper bounds, whatever float underflow did (used by :mod:`fedmm.privacy.ghost_norms`).

A square or product below the dtype's smallest normal (``tiny``, 2^-126 in float32) rounds to a
subnormal or to 0, so a row whose entries are all below about 1e-23 reads as norm 0. Where a norm
is one factor of a record's norm (``|g| |a|``, or the ghost sum of ``(a_t . a_s)(g_t . g_s)``), the
other factor can make what was lost exceed ``max_grad_norm`` (an input of 1e19 times an output
gradient of 1e-23: a curious server's weights can arrange both in a model with unbounded
activations), and the record would pass unclipped. So every factor is taken as an upper bound: a
row of ``d`` entries gets ``d * tiny`` (the most its squares can have lost) added to its squared
norm, and a ghost sum gets the most its products can have lost (:func:`gram_lost`). Clipping to an
upper bound of a record's norm keeps it within ``max_grad_norm``; the bound exceeds the norm by about
``1e-19 sqrt(d)``, nothing next to Opacus' ``1e-6`` in the clipping factor. Norms of explicit
per-record gradients need no such care: what they lose is below ``sqrt(d) * 1e-19``, which that
``1e-6`` already covers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ghost_bound", "gram_lost", "lost", "lost_tensor", "row_bounds"]


def row_bounds(x: Tensor) -> Tensor:
    """Each record's norm taken in ``x``'s own dtype (may overflow: the caller checks), as float64,
    raised by what underflow can have taken from it: an upper bound."""
    rows = x.reshape(x.shape[0], -1)
    return torch.linalg.vector_norm(rows, dim=1).double().hypot_(lost_tensor(rows, rows.shape[1], root=True))


def lost(x: Tensor, entries: int) -> float:
    """The most underflow can take from a sum of ``entries`` squares or products in ``x``'s dtype
    (each below the smallest normal, ``tiny``, rounds to a subnormal or, flushed, to 0)."""
    return entries * torch.finfo(x.dtype).tiny


_lost_tensors: dict[tuple[int, torch.dtype, torch.device, bool], Tensor] = {}


def lost_tensor(x: Tensor, entries: int, *, root: bool = False) -> Tensor:
    """:func:`lost` (or its square root) as a float64 scalar tensor on ``x``'s device, made once
    (a new tensor costs microseconds, and a step asks for the same few each time)."""
    key = (entries, x.dtype, x.device, root)
    found = _lost_tensors.get(key)
    if found is None:
        value = lost(x, entries)
        found = _lost_tensors[key] = torch.tensor(math.sqrt(value) if root else value, dtype=torch.float64, device=x.device)
    return found


def ghost_bound(a: Tensor, g: Tensor, ghost: Tensor) -> Tensor:
    """``ghost``, each record's float64 ghost sum over the positions of ``a`` (``[n, T, in]``) and
    ``g`` (``[n, T, out]``) taken in their dtype, raised by what underflow can have taken from it."""
    return ghost + gram_lost(a, g, row_bounds(a).square(), row_bounds(g).square())


def gram_lost(a: Tensor, g: Tensor, a_squared: Tensor, g_squared: Tensor) -> Tensor:
    """An upper bound on what underflow can take from a ghost sum ``sum_{t,s} (a_t . a_s)(g_t . g_s)``
    over ``a`` of ``[n, T, in]`` and ``g`` of ``[n, T, out]``, given upper bounds on each record's
    ``sum_t |a_t|^2`` and ``sum_t |g_t|^2``: each dot product loses at most ``e_a = in * tiny``
    (``e_g``), each of the ``T^2`` products and sums at most ``2 tiny`` more, and
    ``sum_{t,s} |a_t . a_s| <= T sum_t |a_t|^2`` (Cauchy-Schwarz)."""
    positions = a.shape[1]
    e_a, e_g = lost(a, a.shape[2]), lost(g, g.shape[2])
    tiny = torch.finfo(g.dtype).tiny
    return (a_squared * e_g + g_squared * e_a).mul_(positions).add_(positions * positions * (e_a * e_g + 2 * tiny))
