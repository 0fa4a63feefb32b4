"""Sequence encoders for text token ids and multichannel sensor series, trainable under DP-SGD.

Opacus computes per-sample gradients layer by layer from each layer's input
activations and output gradients. ``torch.nn.GRU`` and ``torch.nn.MultiheadAttention``
apply their weights inside fused functional ops (the ATen/cuDNN RNN kernels,
``F.multi_head_attention_forward``) for which Opacus has no per-sample gradient
rule, so it cannot compute their per-sample gradients and its validator rejects them.
``opacus.layers.DPGRU`` and ``opacus.layers.DPMultiheadAttention`` are drop-in
replacements whose internals are ``nn.Linear``-based, which Opacus does support
(``DPMultiheadAttention``'s batch-first forward is buggy in Opacus 1.6 and is
redone in ``fedmm.models.layers.DPSelfAttention``).

Their parameters therefore live in different places than in torch's layers
(``DPMultiheadAttention`` has ``qlinear``/``klinear``/``vlinear`` instead of one
``in_proj_weight``; ``DPGRU`` keeps per-layer cells), so a state_dict from these
encoders does not load into a model built from ``nn.GRU``/``nn.MultiheadAttention``.
The server must build the same classes as the sites to aggregate and evaluate.
Nested in a model, ``DPGRU``'s state_dict also lists each GRU weight twice, under
torch's name (``gru.weight_ih_l0``) and its cell's (``gru.l0.ih.weight``); both
name one tensor and carry the same values through aggregation.

Each encoder lists in ``grad_sample_modes`` the Opacus ``grad_sample_mode`` values
under which its per-sample gradients are correct; ``tests/test_encoders.py`` checks
that list against per-sample gradients computed one sample at a time. All three
modes work. Under "ghost", Opacus has ghost norms only for ``nn.Linear`` and
``nn.Embedding`` (matched by exact type) and refuses those when called twice in a
forward. ``DPGRU``'s cells are ``RNNLinear`` layers called once per time step, which
Opacus instead handles by fast gradient clipping: their per-sample gradients are
summed over the steps, materialised and then normed. That is exact, but for those
layers ghost mode saves no memory over "hooks".
"""

from __future__ import annotations

from typing import ClassVar

import torch
from opacus.layers import DPGRU
from torch import Tensor, nn

from fedmm.models.layers import DPSelfAttention as _SelfAttention

__all__ = ["TextGRUEncoder", "TextTransformerEncoder", "SensorGRUEncoder"]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` ``[N, L, D]`` over positions where ``mask`` ``[N, L]`` is true; zeros where none is."""
    weights = mask.unsqueeze(-1).to(values.dtype)
    # clamp: an empty row has a zero sum, so it gives zeros instead of 0/0
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class TextGRUEncoder(nn.Module):
    """Embedding, a DP-friendly GRU and a masked mean over token ids ``[N, L]`` (0 pads, at the end)."""

    grad_sample_modes: ClassVar[frozenset[str]] = frozenset({"ghost", "hooks", "functorch"})

    def __init__(self, *, buckets: int, dim: int = 32, hidden: int = 64, out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.embedding = nn.Embedding(buckets, dim)
        self.gru = DPGRU(dim, hidden, batch_first=True)
        self.proj = nn.Sequential(nn.Linear(hidden, out_features), nn.Tanh())

    def forward(self, tokens: Tensor) -> Tensor:
        # The GRU runs over the trailing padding too, but it is causal: states at real
        # tokens never see the padding, and the mean only reads those states. This
        # avoids PackedSequence, which rejects the zero-length rows of empty texts.
        states, _ = self.gru(self.embedding(tokens))
        return self.proj(_masked_mean(states, tokens > 0))


class _PreLNBlock(nn.Module):
    """One pre-LayerNorm transformer block; every submodule is called once per forward."""

    def __init__(self, *, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.Tanh(), nn.Linear(ff, dim))

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        x = x + self.attn(self.norm_attn(x), padding)
        return x + self.ff(self.norm_ff(x))


class TextTransformerEncoder(nn.Module):
    """A small pre-LayerNorm transformer over token ids ``[N, L]`` (0 pads, ``L <= length``), mean-pooled.

    A learned summary token is prepended to every row and never masked: an empty text
    would otherwise mask every key, and a softmax over only ``-inf`` is NaN.
    """

    grad_sample_modes: ClassVar[frozenset[str]] = frozenset({"ghost", "hooks", "functorch"})

    def __init__(self, *, buckets: int, length: int, dim: int = 64, heads: int = 4, layers: int = 1, out_features: int = 64) -> None:
        super().__init__()
        self.out_features = out_features
        self.length = length
        self.tokens = nn.Embedding(buckets, dim)
        self.positions = nn.Embedding(length, dim)
        # Its own one-row table rather than a bare nn.Parameter: Opacus takes per-sample
        # gradients from the module owning a parameter, and has no rule for this
        # encoder but one (and a ghost norm) for nn.Embedding.
        self.summary = nn.Embedding(1, dim)
        # Separate modules per block: ghost clipping refuses a Linear used twice in one
        # forward ("Parameter tying is not supported with Ghost Clipping").
        self.blocks = nn.ModuleList([_PreLNBlock(dim=dim, heads=heads, ff=2 * dim) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Sequential(nn.Linear(dim, out_features), nn.Tanh())

    def forward(self, tokens: Tensor) -> Tensor:
        n, length = tokens.shape
        if length > self.length:
            raise ValueError(f"sequence length {length} exceeds the encoder's {self.length} positions")
        # Index tensors carry the batch dimension so the embedding's per-sample
        # gradients are taken per row like any other input; contiguous because
        # Opacus' ghost-clipping norm for nn.Embedding calls .view() on its indices.
        positions = torch.arange(length, device=tokens.device).expand(n, length).contiguous()
        summary = self.summary(torch.zeros(n, 1, dtype=torch.long, device=tokens.device))
        x = torch.cat([summary, self.tokens(tokens) + self.positions(positions)], dim=1)
        valid = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=tokens.device), tokens > 0], dim=1)
        for block in self.blocks:
            x = block(x, ~valid)
        return self.proj(_masked_mean(self.norm(x), valid))


class SensorGRUEncoder(nn.Module):
    """A DP-friendly GRU over a multichannel series ``[N, C, T]``, averaged over time.

    ``stats``: as :class:`fedmm.models.encoders.SensorEncoder`, the last channels are each
    window's statistics; they join the averaged states before the projection.
    """

    grad_sample_modes: ClassVar[frozenset[str]] = frozenset({"ghost", "hooks", "functorch"})

    def __init__(self, *, channels: int, hidden: int = 64, out_features: int = 64, stats: int = 0) -> None:
        super().__init__()
        self.out_features = out_features
        self.channels, self.stats = channels, stats
        self.gru = DPGRU(channels, hidden, batch_first=True)
        self.proj = nn.Sequential(nn.Linear(hidden + stats, out_features), nn.Tanh())

    def forward(self, series: Tensor) -> Tensor:
        # The mean over all states rather than the last one: gradients reach early
        # time steps directly instead of only through the whole recurrence.
        states, _ = self.gru(series[:, : self.channels].transpose(1, 2))
        pooled = states.mean(dim=1)
        if self.stats:
            pooled = torch.cat([pooled, series[:, self.channels :, 0]], dim=1)
        return self.proj(pooled)
