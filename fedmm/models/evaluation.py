"""Evaluating a model on a split: what the server does every round and a user does with a saved model.

>>> from fedmm.data.synthetic import make_synthetic
>>> from fedmm.models import ModelOptions, ModelRecipe
>>> recipe = ModelRecipe("concat", ModelOptions(width=16))
>>> data = recipe.prepare(make_synthetic(20))
>>> loss, accuracy = evaluate(recipe.build(data.schema), data)
>>> 0.0 <= accuracy <= 1.0
True
>>> result = score(recipe.build(data.schema), data)
>>> result.accuracy == accuracy, sorted(result.report.per_class)[:2]
(True, ['class-0', 'class-1'])

:func:`score` is the public one-pass evaluation: loss, accuracy, macro-F1, per-class
precision/recall/F1/support and the confusion matrix (:mod:`fedmm.models.metrics`, whose
conventions apply), and each auxiliary task's accuracy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmm.data.schema import UNLABELLED, MultimodalDataset
from fedmm.models.metrics import ClassificationReport, classification_report
from fedmm.models.objective import OutputLayout

__all__ = ["INPUT_BOUND", "make_dataset", "output_layout", "predict", "evaluate", "task_accuracies", "Scores", "score"]

INPUT_BOUND = 1e6
"""Every float model input is clamped to ``[-INPUT_BOUND, INPUT_BOUND]`` (see :func:`make_dataset`)."""

logger = logging.getLogger(__name__)


def make_dataset(ds: MultimodalDataset) -> TensorDataset:
    """Wrap aligned arrays as ``(*modalities, present, label, *task_labels)`` tensors.

    An auxiliary task's labels index its classes in ``ds.schema.tasks``; a value the
    schema does not list (a speaker the server has never seen) is -1, which the
    objective ignores.

    Every float input is clamped to ``[-INPUT_BOUND, INPUT_BOUND]`` (1e6) and a NaN, which
    no loader lets through, becomes 0: no record's forward pass can then overflow float32
    (an overflow to inf, then NaN, would poison a whole batch's update under Opacus'
    two-pass ghost clipping). Preprocessed features (pixels in [-1, 1], standardised
    spectrograms and series, embeddings) lie far inside the bound; raw tabular values
    beyond it are clamped, with a warning naming the modalities. The clamp is a fixed
    function of each value on its own, the same at every site and independent of any data,
    so it is part of the model's input map: it changes no record's influence on another,
    nor DP-SGD's sensitivity, nor its guarantee.
    """
    tensors = [torch.from_numpy(np.array(ds.features[name])) for name in ds.schema.names]  # copies: bounded in place
    bounded = {name: n for name, t in zip(ds.schema.names, tensors) if (n := _bounded(t))}
    if bounded:
        logger.warning(
            "input values that are NaN or beyond +-%g were bounded to that range (NaN to 0), so that no forward pass "
            "overflows: %s. Fix: rescale or standardise these columns if that was not meant", INPUT_BOUND,
            ", ".join(f"{n} in {name!r}" for name, n in bounded.items()),
        )
    tasks = []
    for name, classes in ds.schema.tasks:
        index = {c: i for i, c in enumerate(classes)}
        values = ds.groups.get(name, np.full(len(ds), None))
        tasks.append(torch.tensor([index.get(str(v), -1) for v in values], dtype=torch.long))
    return TensorDataset(*tensors, torch.from_numpy(ds.present.astype(np.float32)), torch.from_numpy(np.array(ds.label)), *tasks)


def _bounded(values: torch.Tensor) -> int:
    """Clamp ``values`` in place to +-INPUT_BOUND, NaN to 0 (see :func:`make_dataset`); return how many changed."""
    if not values.is_floating_point():
        return 0  # token ids
    outside = int((~(values.abs() <= INPUT_BOUND)).sum())  # NaN counts too
    if outside:
        torch.nan_to_num_(values, nan=0.0).clamp_(-INPUT_BOUND, INPUT_BOUND)
    return outside


def output_layout(model: nn.Module, ds: MultimodalDataset) -> OutputLayout:
    """The model's output layout (set by ModelRecipe.build), or a plain classifier's."""
    layout = getattr(model, "output_layout", None)
    return layout if layout is not None else OutputLayout((("label", ds.schema.num_classes, 1.0),), len(ds.schema.modalities))


@torch.no_grad()
def predict(model: nn.Module, ds: MultimodalDataset, batch_size: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's outputs on ``ds`` and its labels (main, then auxiliary tasks)."""
    model.eval()
    m = len(ds.schema.modalities)
    outputs, labels = [], []
    for batch in DataLoader(make_dataset(ds), batch_size=batch_size):
        outputs.append(model(*batch[: m + 1]))
        labels.append(batch[m + 1 :])
    if not outputs:
        return torch.zeros(0, output_layout(model, ds).width), [torch.zeros(0, dtype=torch.long) for _ in range(1 + len(ds.schema.tasks))]
    return torch.cat(outputs), [torch.cat(column) for column in zip(*labels)]


def evaluate(model: nn.Module, ds: MultimodalDataset, *, batch_size: int = 512) -> tuple[float, float]:
    """Return ``(mean cross-entropy, accuracy)`` of the main task on the labelled samples of ``ds``."""
    ds = ds.labelled()
    output, labels = predict(model, ds, batch_size)
    logits = output_layout(model, ds).logits(output)
    n = max(1, len(ds))
    loss = float(nn.functional.cross_entropy(logits, labels[0], reduction="sum")) if len(ds) else 0.0
    return loss / n, int((logits.argmax(dim=1) == labels[0]).sum()) / n


def task_accuracies(model: nn.Module, ds: MultimodalDataset, *, batch_size: int = 512) -> dict[str, float]:
    """Accuracy of each auxiliary task on the samples whose task label is known."""
    if not ds.schema.tasks:
        return {}
    output, labels = predict(model, ds, batch_size)
    layout = output_layout(model, ds)
    out = {}
    for t, (name, _) in enumerate(ds.schema.tasks, start=1):
        known = labels[t] >= 0
        hits = (layout.logits(output, t).argmax(dim=1) == labels[t]) & known
        out[name] = int(hits.sum()) / max(1, int(known.sum()))
    return out


@dataclass(frozen=True)
class Scores:
    """One evaluation of a model on a split: the main task's loss and report, and each auxiliary task's accuracy."""

    loss: float  # mean cross-entropy over the labelled samples
    report: ClassificationReport  # accuracy, macro-F1, per class, confusion (labelled samples)
    tasks: dict[str, float]

    @property
    def accuracy(self) -> float:
        return self.report.accuracy

    @property
    def macro_f1(self) -> float:
        return self.report.macro_f1


def score(model: nn.Module, ds: MultimodalDataset, *, batch_size: int = 512) -> Scores:
    """Evaluate ``model`` on ``ds`` in one pass: what :func:`evaluate` and :func:`task_accuracies` give, plus
    macro-F1, per-class scores and the confusion matrix (class names from ``ds.schema.classes``).

    Unlabelled samples count for no main-task figure (as in :func:`evaluate`); an auxiliary
    task counts the samples whose task label is known (as in :func:`task_accuracies`).
    """
    output, labels = predict(model, ds, batch_size)
    layout = output_layout(model, ds)
    logits = layout.logits(output)
    known = labels[0] != UNLABELLED
    logits, truth = logits[known], labels[0][known]
    n = int(known.sum())
    loss = float(nn.functional.cross_entropy(logits, truth, reduction="sum")) / n if n else 0.0
    report = classification_report(logits.argmax(dim=1).numpy(), truth.numpy(), ds.schema.classes)
    tasks = {}
    for t, (name, _) in enumerate(ds.schema.tasks, start=1):
        seen = labels[t] >= 0
        hits = (layout.logits(output, t).argmax(dim=1) == labels[t]) & seen
        tasks[name] = int(hits.sum()) / max(1, int(seen.sum()))
    return Scores(loss, report, tasks)
