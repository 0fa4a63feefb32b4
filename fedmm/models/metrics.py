"""Classification metrics from predictions and labels: accuracy, macro-F1, per class, confusion.

numpy only (no scikit-learn). The conventions, for every class ``k`` of the schema:

- ``support``: the samples whose true class is ``k``;
- ``precision``: of the samples predicted ``k``, the share that are ``k``; **0 when nothing
  is predicted** ``k`` (and such a class still counts in the macro average when it has
  support: a model that never predicts a class is penalised for it);
- ``recall``: of the samples that are ``k``, the share predicted ``k``; 0 when the support is 0;
- ``f1``: the harmonic mean of precision and recall; 0 when both are 0;
- ``macro_f1``: the unweighted mean of ``f1`` over the classes **present in the labels**
  (support > 0). A class absent from the evaluated set is still reported, with support 0
  (and its precision, which predictions of it can make 0), but left out of the macro
  average: no set can score a class it does not contain. 0 when no sample is labelled.
- ``confusion[i][j]``: the samples of true class ``i`` predicted as class ``j`` (rows: true
  class, columns: predicted, both in the schema's class order).

>>> r = classification_report([0, 1, 1, 0], [0, 1, 0, 0], ("cat", "dog", "eel"))
>>> r.accuracy, round(r.macro_f1, 4), r.confusion.tolist()
(0.75, 0.7333, [[2, 1, 0], [0, 1, 0], [0, 0, 0]])
>>> r.per_class["eel"]
ClassScores(precision=0.0, recall=0.0, f1=0.0, support=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ClassScores", "ClassificationReport", "confusion_matrix", "classification_report"]


@dataclass(frozen=True)
class ClassScores:
    """One class's precision, recall, F1 and support (see the module's conventions)."""

    precision: float
    recall: float
    f1: float
    support: int

    def to_json(self) -> dict[str, float | int]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1, "support": self.support}


@dataclass(frozen=True)
class ClassificationReport:
    """Accuracy, macro-F1, per-class scores and the confusion matrix of one evaluation."""

    classes: tuple[str, ...]
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassScores]
    confusion: np.ndarray  # int64 [K, K]: rows true class, columns predicted

    @property
    def samples(self) -> int:
        """The labelled samples evaluated."""
        return int(self.confusion.sum())

    def to_json(self) -> dict[str, Any]:
        """JSON-ready: ``classes``, ``samples``, ``accuracy``, ``macro_f1``, ``per_class``, ``confusion`` (lists)."""
        return {
            "classes": list(self.classes), "samples": self.samples, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
            "per_class": {name: scores.to_json() for name, scores in self.per_class.items()},
            "confusion": self.confusion.tolist(),
        }


def confusion_matrix(predicted: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, K]`` counts, rows the true class and columns the predicted one.

    Raises
    ------
    ValueError
        When the lengths differ or a class index lies outside ``[0, num_classes)``.
    """
    pred = np.asarray(predicted, dtype=np.int64).reshape(-1)
    true = np.asarray(labels, dtype=np.int64).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions for {true.size} labels")
    for what, values in (("prediction", pred), ("label", true)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"a {what} lies outside the {num_classes} classes: {sorted(set(values[(values < 0) | (values >= num_classes)].tolist()))[:5]}")
    return np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_report(predicted: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray, classes: Sequence[str]) -> ClassificationReport:
    """The metrics of ``predicted`` against ``labels`` (class indices into ``classes``)."""
    names = tuple(str(c) for c in classes)
    confusion = confusion_matrix(predicted, labels, len(names))
    hits = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted_as = confusion.sum(axis=0)
    precision = np.divide(hits, predicted_as, out=np.zeros_like(hits), where=predicted_as > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    present = support > 0
    total = int(support.sum())
    return ClassificationReport(
        classes=names,
        accuracy=float(hits.sum() / total) if total else 0.0,
        macro_f1=float(f1[present].mean()) if present.any() else 0.0,
        per_class={name: ClassScores(float(precision[k]), float(recall[k]), float(f1[k]), int(support[k])) for k, name in enumerate(names)},
        confusion=confusion,
    )
