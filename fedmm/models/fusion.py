"""Fusion models: one encoder per modality, a fusion step, task heads.

Every model takes one tensor per modality, in schema order, then the presence
mask ``[B, M]`` (1.0 present, 0.0 absent): ``model(*modalities, present)``. An
absent modality's embedding is multiplied by 0 and the mask itself is an input
of the fusion, so the model knows what is missing instead of reading zeros as data.

A model returns **one tensor** ``[B, outputs]``: the logits of every task, then
(with a contrastive objective) one projection per modality. One tensor rather
than a tuple keeps every Opacus grad-sample mode working unchanged;
:class:`fedmm.models.objective.OutputLayout` names the slices.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FusionNet", "ConcatFusionNet", "GatedFusionNet", "LateFusionNet", "AttentionFusionNet", "EmbeddingFusionNet"]


def _common_width(encoders: nn.ModuleList, fusion: str) -> int:
    """The one output width that fusions mixing embeddings element-wise need."""
    widths = {int(e.out_features) for e in encoders}  # type: ignore[arg-type]
    if len(widths) != 1:
        raise ValueError(f"{fusion} fusion needs encoders of one output width, got {sorted(widths)}; build every encoder with the same out_features")
    return widths.pop()


class FusionNet(nn.Module):
    """Encoders, a fusion step (:meth:`fuse`, per subclass) giving ``outputs`` logits, and
    optional per-modality projections for a contrastive objective (``projection`` wide)."""

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, outputs: int, *, projection: int = 0) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.outputs = outputs
        self.projections = (
            nn.ModuleList(nn.Linear(int(e.out_features), projection) for e in self.encoders) if projection else None  # type: ignore[arg-type]
        )

    def fuse(self, embeddings: list[Tensor], present: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *inputs: Tensor) -> Tensor:
        *modalities, present = inputs
        embeddings = [encoder(x) for encoder, x in zip(self.encoders, modalities)]
        out = self.fuse(embeddings, present)
        if self.projections is None:
            return out
        return torch.cat([out, *(project(e) for project, e in zip(self.projections, embeddings))], dim=1)


class ConcatFusionNet(FusionNet):
    """Early fusion by concatenation of masked modality embeddings (and the mask), then a linear head."""

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, outputs: int, *, projection: int = 0) -> None:
        super().__init__(encoders, outputs, projection=projection)
        width = sum(int(e.out_features) for e in self.encoders) + len(self.encoders)  # type: ignore[arg-type, misc]
        self.head = nn.Linear(width, outputs)

    def fuse(self, embeddings: list[Tensor], present: Tensor) -> Tensor:
        parts = [e * present[:, j : j + 1] for j, e in enumerate(embeddings)]
        return self.head(torch.cat([*parts, present], dim=1))


class GatedFusionNet(FusionNet):
    """Gated fusion: a learned, input-dependent weight per modality (Arevalo et al., 2017, GMU-style).

    Gates ``sigmoid(W [e_1 .. e_M, mask])`` scale each modality's embedding; absent
    modalities get gate 0, and the fused embedding is the gate-weighted mean over the
    present ones. All encoders must share one output width.
    """

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, outputs: int, *, projection: int = 0) -> None:
        super().__init__(encoders, outputs, projection=projection)
        width = _common_width(self.encoders, "gated")
        m = len(self.encoders)
        self.gate = nn.Linear(width * m + m, m)
        self.head = nn.Linear(width, outputs)

    def fuse(self, embeddings: list[Tensor], present: Tensor) -> Tensor:
        embeddings = [e * present[:, j : j + 1] for j, e in enumerate(embeddings)]
        gates = torch.sigmoid(self.gate(torch.cat([*embeddings, present], dim=1))) * present  # [B, M]
        stacked = torch.stack(embeddings, dim=1)  # [B, M, W]
        fused = (gates.unsqueeze(-1) * stacked).sum(dim=1) / gates.sum(dim=1, keepdim=True).clamp(min=1e-6)
        return self.head(fused)


class LateFusionNet(FusionNet):
    """Late fusion: one classifier per modality; their logits averaged over the *present*
    modalities with learned positive weights (renormalised, so a missing modality neither
    votes nor dilutes the others)."""

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, outputs: int, *, projection: int = 0) -> None:
        super().__init__(encoders, outputs, projection=projection)
        self.heads = nn.ModuleList(nn.Linear(int(e.out_features), outputs) for e in self.encoders)  # type: ignore[arg-type]
        # one learned weight per modality, as an embedding row so Opacus can clip it per sample;
        # all equal at the start (a random start lets a weak modality outvote a strong one)
        self.weights = nn.Embedding(1, len(self.encoders))
        nn.init.zeros_(self.weights.weight)

    def fuse(self, embeddings: list[Tensor], present: Tensor) -> Tensor:
        logits = torch.stack([head(e) for head, e in zip(self.heads, embeddings)], dim=1)  # [B, M, K]
        index = torch.zeros(present.shape[0], dtype=torch.long, device=present.device)
        w = nn.functional.softplus(self.weights(index)) * present  # [B, M]
        return (w.unsqueeze(-1) * logits).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp(min=1e-6)


class AttentionFusionNet(FusionNet):
    """Cross-modal self-attention over one token per modality (Opacus' DPMultiheadAttention layers).

    Each token is the modality's embedding plus a learned modality embedding; an absent
    modality's token is a learned *absent* token and is masked out as a key
    (``key_padding_mask``), so no present token attends to it. The output is the mean of
    the present tokens. All encoders must share one output width.
    """

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, outputs: int, *, projection: int = 0, heads: int = 4) -> None:
        from fedmm.models.layers import DPSelfAttention

        super().__init__(encoders, outputs, projection=projection)
        width = _common_width(self.encoders, "attention")
        m = len(self.encoders)
        self.tokens = nn.Embedding(2 * m, width)  # rows 0..m-1: modality embeddings; m..2m-1: absent tokens
        # Opacus' DPMultiheadAttention with its batch-first arithmetic corrected (see DPSelfAttention)
        self.attention = DPSelfAttention(width, heads)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, outputs)

    def fuse(self, embeddings: list[Tensor], present: Tensor) -> Tensor:
        b, m = present.shape
        ids = torch.arange(m, device=present.device).expand(b, m)
        embedded = torch.stack(embeddings, dim=1)  # [B, M, W]
        mask = present.unsqueeze(-1)
        # one embedding lookup (Opacus' ghost clipping refuses a layer used twice in a pass)
        learned = self.tokens(torch.where(present > 0.5, ids, ids + m))
        tokens = mask * embedded + learned
        # a sample with nothing present (possible after choosing modalities) would mask every
        # key and give NaN; it attends to its absent tokens instead, and its output is zeroed below
        hidden = (present < 0.5) & (present.sum(dim=1, keepdim=True) > 0)
        attended = self.attention(tokens, hidden)
        out = self.norm(tokens + attended) * mask
        return self.head(out.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))


class EmbeddingFusionNet(FusionNet):
    """Fusion over frozen pretrained embeddings (sentence embeddings, a pretrained image
    encoder): the frozen encoders run once when the data is prepared, so DP-SGD trains
    only small projections, one hidden layer over their masked concatenation, and the head.
    Modalities without pretrained features keep their trainable encoders."""

    def __init__(self, encoders: list[nn.Module] | nn.ModuleList, outputs: int, *, projection: int = 0, hidden: int = 128) -> None:
        super().__init__(encoders, outputs, projection=projection)
        width = sum(int(e.out_features) for e in self.encoders) + len(self.encoders)  # type: ignore[arg-type, misc]
        self.hidden = nn.Sequential(nn.Linear(width, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, outputs)

    def fuse(self, embeddings: list[Tensor], present: Tensor) -> Tensor:
        parts = [e * present[:, j : j + 1] for j, e in enumerate(embeddings)]
        return self.head(self.hidden(torch.cat([*parts, present], dim=1)))
