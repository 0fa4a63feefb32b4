"""Layers Opacus lacks or gets wrong, built from Opacus' own DP layers."""

from __future__ import annotations

import torch
from opacus.layers import DPMultiheadAttention
from torch import Tensor

__all__ = ["DPSelfAttention"]


class DPSelfAttention(DPMultiheadAttention):
    """Opacus' ``DPMultiheadAttention`` (batch first) with a corrected forward, self-attention only.

    In Opacus 1.6 its ``batch_first=True`` path reshapes the ``[N * heads, L, head_dim]``
    attention output straight to ``[N, L, dim]`` without moving the head axis, which
    splices heads of other positions into each position (it differs from
    ``nn.MultiheadAttention`` given the same weights, and padding leaks into real
    tokens; meta-pytorch/opacus#825). The parameters (``qlinear``, ``klinear``,
    ``vlinear``, ``out_proj``, all ``nn.Linear``) and state_dict keys are the parent's;
    only the arithmetic between them is redone, so Opacus' per-sample gradients are
    unaffected. Drop this class once the pinned Opacus has the fix.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads, batch_first=True)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        """Attend over ``x`` ``[N, L, dim]``, ignoring keys where ``padding`` ``[N, L]`` is true."""
        n, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads

        def split(t: Tensor) -> Tensor:
            return t.view(n, length, heads, head_dim).transpose(1, 2)

        q, k, v = split(self.qlinear(x)) * head_dim**-0.5, split(self.klinear(x)), split(self.vlinear(x))
        scores = (q @ k.transpose(-2, -1)).masked_fill(padding[:, None, None, :], float("-inf"))
        attended = torch.softmax(scores, dim=-1) @ v
        return self.out_proj(attended.transpose(1, 2).reshape(n, length, dim))
