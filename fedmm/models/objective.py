"""What a model's output means, and the training objective over it.

A fusion model returns one tensor ``[B, width]`` (see :mod:`fedmm.models.fusion`):
the main task's logits, then each auxiliary task's logits (multi-task heads, e.g.
digit and speaker), then, with a contrastive objective, one projection per modality.
:class:`OutputLayout` names those slices; :class:`Objective` is the loss over them.

What keeps DP-SGD's claim true: Opacus clips each record's gradient, which bounds a
record's influence only if the loss is a sum of per-record terms that each depend on
that record alone. Every term here is per record, except ``contrastive='clip'``
(CLIP's in-batch negatives make one record's loss depend on the others in its batch),
which is therefore refused under DP; ``contrastive='align'`` matches the modalities
of one sample with each other and is per record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["OutputLayout", "Objective", "CONTRASTIVE"]

CONTRASTIVE = ("none", "align", "clip")


@dataclass(frozen=True)
class OutputLayout:
    """The slices of a model's output tensor.

    >>> layout = OutputLayout((("label", 10, 1.0), ("speaker", 6, 0.5)), modalities=2, projection=8)
    >>> layout.logits_width, layout.width
    (16, 32)
    """

    tasks: tuple[tuple[str, int, float], ...]  # (name, classes, loss weight); the first is the main label
    modalities: int
    projection: int = 0  # width of each modality's projection; 0: no contrastive output

    @property
    def logits_width(self) -> int:
        return sum(k for _, k, _ in self.tasks)

    @property
    def width(self) -> int:
        return self.logits_width + self.modalities * self.projection

    def logits(self, output: Tensor, task: int = 0) -> Tensor:
        """The logits of task ``task`` (0 = the main label)."""
        start = sum(k for _, k, _ in self.tasks[:task])
        return output[:, start : start + self.tasks[task][1]]

    def projections(self, output: Tensor) -> Tensor:
        """``[B, M, projection]``, one projection per modality."""
        return output[:, self.logits_width :].reshape(output.shape[0], self.modalities, self.projection)


class Objective(nn.Module):
    """Weighted cross-entropy of the main task, plus weighted auxiliary-task losses, plus an
    optional contrastive term; called as ``objective(output, present, label, *task_labels)``.

    The mean is over the batch size (never over a sum of class weights), so one record's
    loss does not depend on the others. Auxiliary labels of -1 (unknown) add nothing.
    Honours ``reduction`` (Opacus' ghost clipping sets it to ``"none"``).
    """

    def __init__(
        self,
        layout: OutputLayout,
        *,
        class_weights: Tensor | None = None,
        contrastive: str = "none",
        contrastive_weight: float = 0.0,
        temperature: float = 0.1,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if contrastive not in CONTRASTIVE:
            raise ValueError(f"contrastive must be one of {CONTRASTIVE}, got {contrastive!r}")
        if contrastive != "none" and layout.projection == 0:
            raise ValueError("a contrastive objective needs a model built with projections")
        self.layout = layout
        self.contrastive = contrastive
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.reduction = reduction
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", class_weights)

    def forward(self, output: Tensor, present: Tensor, label: Tensor, *task_labels: Tensor) -> Tensor:
        loss = nn.functional.cross_entropy(self.layout.logits(output), label, reduction="none")
        if self.class_weights is not None:
            loss = loss * self.class_weights[label]
        for t, target in enumerate(task_labels, start=1):
            known = target >= 0
            task_loss = nn.functional.cross_entropy(self.layout.logits(output, t), target.clamp(min=0), reduction="none")
            loss = loss + self.layout.tasks[t][2] * task_loss * known
        if self.contrastive == "align":
            loss = loss + self.contrastive_weight * alignment_loss(self.layout.projections(output), present)
        elif self.contrastive == "clip":
            loss = loss + self.contrastive_weight * clip_loss(self.layout.projections(output), present, self.temperature)
        if self.reduction == "none":
            return loss
        return loss.sum() if self.reduction == "sum" else loss.mean()


def alignment_loss(projections: Tensor, present: Tensor) -> Tensor:
    """Per sample: mean of ``1 - cos`` over the pairs of its present modalities (0 with fewer than two).

    Siamese-style, within one record only, so it is a valid per-record term for DP-SGD.
    """
    z = nn.functional.normalize(projections, dim=-1)
    similarity = z @ z.transpose(1, 2)  # [B, M, M]
    pairs = present.unsqueeze(2) * present.unsqueeze(1)
    pairs = torch.triu(pairs, diagonal=1)
    return ((1.0 - similarity) * pairs).sum(dim=(1, 2)) / pairs.sum(dim=(1, 2)).clamp(min=1.0)


def clip_loss(projections: Tensor, present: Tensor, temperature: float) -> Tensor:
    """Per sample: symmetric InfoNCE (CLIP) over each pair of modalities, other samples of
    the batch as negatives; only samples with both modalities of a pair take part.
    Not a per-record loss: dp=false only."""
    z = nn.functional.normalize(projections, dim=-1)
    b, m, _ = z.shape
    total = torch.zeros(b, dtype=z.dtype, device=z.device)
    count = torch.zeros(b, dtype=z.dtype, device=z.device)
    eye = torch.arange(b, device=z.device)
    for i in range(m):
        for j in range(i + 1, m):
            both = present[:, i] * present[:, j]
            if both.sum() < 2:
                continue
            absent = both.unsqueeze(0) < 0.5  # columns of samples without the pair: no negatives
            rows = both.unsqueeze(1) > 0.5  # rows of such samples: zeroed, weighted 0 below
            raw = (z[:, i] @ z[:, j].T) / temperature  # [anchor in modality i, candidate in j]
            i_to_j = torch.where(rows, raw.masked_fill(absent, float("-inf")), torch.zeros_like(raw))
            j_to_i = torch.where(rows, raw.T.masked_fill(absent, float("-inf")), torch.zeros_like(raw))
            row = nn.functional.cross_entropy(i_to_j, eye, reduction="none")
            col = nn.functional.cross_entropy(j_to_i, eye, reduction="none")
            total = total + both * (row + col) / 2
            count = count + both
    return total / count.clamp(min=1.0)
