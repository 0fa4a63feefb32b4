"""Fusion models: one encoder per modality, a fusion step, a classifier head.

Every model takes one tensor per modality, in schema order, then the presence
mask ``[B, M]`` (1.0 present, 0.0 absent): ``model(*modalities, present)``. An
absent modality's embedding is multiplied by 0 and the mask itself is an input
of the head, so the model knows what is missing instead of reading zeros as data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConcatFusionNet", "GatedFusionNet", "LateFusionNet", "AttentionFusionNet"]


def _common_width(encoders: nn.ModuleList, fusion: str) -> int:
    """The one output width that fusions mixing embeddings element-wise need."""
    widths = {int(e.out_features) for e in encoders}  # type: ignore[arg-type]
    if len(widths) != 1:
        raise ValueError(f"{fusion} fusion needs encoders of one output width, got {sorted(widths)}; build every encoder with the same out_features")
    return widths.pop()


class ConcatFusionNet(nn.Module):
    """Early fusion by concatenation of masked modality embeddings (and the mask), then a linear head."""

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, num_classes: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        width = sum(int(e.out_features) for e in self.encoders) + len(self.encoders)  # type: ignore[arg-type, misc]
        self.head = nn.Linear(width, num_classes)

    def forward(self, *inputs: Tensor) -> Tensor:
        *modalities, present = inputs
        parts = [encoder(x) * present[:, j : j + 1] for j, (encoder, x) in enumerate(zip(self.encoders, modalities))]
        return self.head(torch.cat([*parts, present], dim=1))


class GatedFusionNet(nn.Module):
    """Gated fusion: a learned, input-dependent weight per modality (Arevalo et al., 2017, GMU-style).

    Gates ``sigmoid(W [e_1 .. e_M, mask])`` scale each modality's embedding; absent
    modalities get gate 0, and the fused embedding is the gate-weighted mean over the
    present ones. All encoders must share one output width.
    """

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, num_classes: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        width = _common_width(self.encoders, "gated")
        m = len(self.encoders)
        self.gate = nn.Linear(width * m + m, m)
        self.head = nn.Linear(width, num_classes)

    def forward(self, *inputs: Tensor) -> Tensor:
        *modalities, present = inputs
        embeddings = [encoder(x) * present[:, j : j + 1] for j, (encoder, x) in enumerate(zip(self.encoders, modalities))]
        gates = torch.sigmoid(self.gate(torch.cat([*embeddings, present], dim=1))) * present  # [B, M]
        stacked = torch.stack(embeddings, dim=1)  # [B, M, W]
        fused = (gates.unsqueeze(-1) * stacked).sum(dim=1) / gates.sum(dim=1, keepdim=True).clamp(min=1e-6)
        return self.head(fused)


class LateFusionNet(nn.Module):
    """Late fusion: one classifier per modality; their logits averaged over the *present*
    modalities with learned positive weights (renormalised, so a missing modality neither
    votes nor dilutes the others)."""

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, num_classes: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.heads = nn.ModuleList(nn.Linear(int(e.out_features), num_classes) for e in self.encoders)  # type: ignore[arg-type]
        # one learned weight per modality, as an embedding row so Opacus can clip it per sample
        self.weights = nn.Embedding(1, len(self.encoders))

    def forward(self, *inputs: Tensor) -> Tensor:
        *modalities, present = inputs
        logits = torch.stack([head(encoder(x)) for encoder, head, x in zip(self.encoders, self.heads, modalities)], dim=1)  # [B, M, K]
        index = torch.zeros(present.shape[0], dtype=torch.long, device=present.device)
        w = nn.functional.softplus(self.weights(index)) * present  # [B, M]
        return (w.unsqueeze(-1) * logits).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1e-6)


class AttentionFusionNet(nn.Module):
    """Cross-modal self-attention over one token per modality (Opacus' DPMultiheadAttention).

    Each token is the modality's embedding plus a learned modality embedding; an absent
    modality's token is a learned *absent* token and is masked out as a key
    (``key_padding_mask``), so no present token attends to it. The output is the mean of
    the present tokens. All encoders must share one output width.
    """

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, num_classes: int, *, heads: int = 4) -> None:
        from opacus.layers import DPMultiheadAttention

        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        width = _common_width(self.encoders, "attention")
        m = len(self.encoders)
        self.tokens = nn.Embedding(2 * m, width)  # rows 0..m-1: modality embeddings; m..2m-1: absent tokens
        self.attention = DPMultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, *inputs: Tensor) -> Tensor:
        *modalities, present = inputs
        b, m = present.shape
        ids = torch.arange(m, device=present.device).expand(b, m)
        embedded = torch.stack([encoder(x) for encoder, x in zip(self.encoders, modalities)], dim=1)  # [B, M, W]
        mask = present.unsqueeze(-1)
        # one embedding lookup (Opacus' ghost clipping refuses a layer used twice in a pass)
        learned = self.tokens(torch.where(present > 0.5, ids, ids + m))
        tokens = mask * embedded + learned
        attended, _ = self.attention(tokens, tokens, tokens, key_padding_mask=present < 0.5, need_weights=False)
        out = self.norm(tokens + attended) * mask
        return self.head(out.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))
