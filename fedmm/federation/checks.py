"""The server's checks of one reply, testable without Flower's engine: the update's tensors
(:func:`check_update`), its FedAvg weight (:func:`check_weight`), and the round's training
metrics (:func:`aggregate_train_metrics`: epsilon as a maximum, never an average)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import MetricRecord, RecordDict

from fedmm import protocol
from fedmm.errors import FederationError
from fedmm.privacy.client_dp import update_norm

__all__ = ["aggregate_train_metrics", "check_update", "check_weight"]


def aggregate_train_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Average the training loss weighted by examples; take the maximum epsilon.

    Under DP the sites send no training loss (it is not covered by DP-SGD's guarantee);
    the average is then left out, never made up.

    >>> from flwr.app import MetricRecord, RecordDict
    >>> a = RecordDict({"metrics": MetricRecord({"num-examples": 1, "train-loss": 1.0, "epsilon": 2.0})})
    >>> b = RecordDict({"metrics": MetricRecord({"num-examples": 3, "train-loss": 3.0, "epsilon": 5.0})})
    >>> dict(aggregate_train_metrics([a, b], "num-examples"))
    {'num-examples': 4, 'epsilon': 5.0, 'train-loss': 2.5}
    """
    metrics = [rec.metric_records[protocol.METRICS] for rec in records]

    def number(record: MetricRecord, key: str) -> float:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FederationError(f"a site reported metric '{key}' = {value!r}; expected a finite number")
        return float(value)

    weights = [number(m, weighting_metric_name) for m in metrics]
    total = sum(weights)
    out: dict[str, int | float | list[int] | list[float]] = {protocol.NUM_EXAMPLES: int(total), protocol.EPSILON: max(number(m, protocol.EPSILON) for m in metrics)}
    if all(protocol.TRAIN_LOSS in m for m in metrics):
        out[protocol.TRAIN_LOSS] = sum(w * number(m, protocol.TRAIN_LOSS) for w, m in zip(weights, metrics)) / total
    return MetricRecord(out)


def check_update(
    arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray | tuple[int, ...]] | None, *,
    clip_norm: float | None = None, max_norm: float | None = None, base: Mapping[str, np.ndarray] | None = None,
) -> tuple[str, str] | None:
    """Why an update cannot be aggregated, as ``(kind, detail)``, or None when it can.

    ``kind`` is one of ``tensors``, ``dtype``, ``shape``, ``non-finite``, ``norm``.
    ``reference`` maps each expected tensor to the global model's tensor (its dtype must be
    matched exactly: nothing is ever cast) or to its shape alone; any dtype other than a real
    number (bool, complex, object) is refused whatever the reference. The norm is that of
    ``arrays - base`` (``base``: the global weights, when a site sends weights; None when it
    sends its update); ``clip_norm`` is the agreed client-level clip and ``max_norm`` the
    run's ``max-update-norm``, each with a relative tolerance of 1e-4 for float32 rounding.

    >>> check_update({"w": np.array([np.nan])}, {"w": (1,)})
    ('non-finite', "tensor 'w' holds 1 NaN or infinite value(s)")
    >>> check_update({"w": np.ones(4)}, {"w": (4,)}, clip_norm=1.0)
    ('norm', 'L2 norm 2 is above the agreed client-clip-norm 1')
    >>> check_update({"w": np.ones(4)}, {"w": np.zeros(4, np.float32)})
    ('dtype', "tensor 'w' is float64, the global model's is float32 (never cast)")
    """
    if reference is not None and set(arrays) != set(reference):
        return "tensors", f"tensors {sorted(set(arrays) ^ set(reference))} differ from the global model's"
    for name, value in arrays.items():
        expected = reference[name] if reference is not None else None
        if isinstance(expected, np.ndarray) and value.dtype != expected.dtype:
            return "dtype", f"tensor '{name}' is {value.dtype}, the global model's is {expected.dtype} (never cast)"
        if value.dtype.kind not in "fiu":
            return "dtype", f"tensor '{name}' is {value.dtype}; only real numbers are aggregated"
    for name, value in arrays.items():
        expected = reference[name] if reference is not None else None
        shape = expected.shape if isinstance(expected, np.ndarray) else expected
        if shape is not None and tuple(value.shape) != tuple(shape):
            return "shape", f"tensor '{name}' has shape {tuple(value.shape)}, the global model {tuple(shape)}"
    for name, value in arrays.items():
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            return "non-finite", f"tensor '{name}' holds {int(np.sum(~np.isfinite(value)))} NaN or infinite value(s)"
    if clip_norm is None and max_norm is None:
        return None
    with np.errstate(over="ignore"):  # a norm that overflows float64 is inf, and refused
        norm = update_norm([np.asarray(v, np.float64) - np.asarray(base[k], np.float64) for k, v in arrays.items()] if base is not None else arrays)
    for bound, name in ((clip_norm, "client-clip-norm"), (max_norm, "max-update-norm")):
        if bound is not None and not norm <= bound * (1 + 1e-4):
            return "norm", f"L2 norm {norm:.6g} is above the agreed {name} {bound:g}"
    return None


def check_weight(value: object, *, dp: bool, max_weight: int) -> tuple[str, str] | None:
    """Why a reply's FedAvg weight (``num-examples``) is not an agreed one, as ``(kind, detail)``, or None.

    Under ``dp=true`` every site sends exactly 1 (its record count is not released);
    without DP an integer in ``[1, max-site-weight]``.

    >>> check_weight(-99, dp=False, max_weight=10**6)
    ('weight', 'num-examples -99 is outside the agreed [1, max-site-weight=1000000]')
    >>> check_weight(1.5, dp=False, max_weight=10**6)
    ('weight', 'num-examples is 1.5; the agreed weight is an integer')
    """
    if isinstance(value, bool) or not isinstance(value, int):
        return "weight", f"num-examples is {value!r}; the agreed weight is an integer"
    if dp and value != 1:
        return "weight", f"num-examples is {value}; under dp=true every site sends exactly 1 (no record count leaves a site)"
    if not 1 <= value <= max_weight:
        return "weight", f"num-examples {value} is outside the agreed [1, max-site-weight={max_weight}]"
    return None
