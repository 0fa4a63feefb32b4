"""The server's central evaluation: the global model scored on the server's own held-out data.

Every round the server scores the new global model on its held-out set (accuracy, loss,
macro-F1, per-class precision/recall/F1/support, the confusion matrix, each auxiliary
task's accuracy; :func:`fedmm.models.evaluation.score`). The held-out set is the server's
own, never a site's: scoring it costs the sites no privacy, and so does choosing the best
round by it (:class:`BestRound`: the highest held-out accuracy, ties to the higher
macro-F1, then to the earlier round). That best score is a maximum over rounds picked on
the same set it is measured on, so it is optimistic; score ``model-best.pt`` on other
data (``fedmm evaluate RUN --data ...``) for an unbiased figure.

:class:`Participants` names the sites whose updates were aggregated in a round, from the
strategy's :class:`~fedmm.federation.book.FederationBook`: the sites name themselves only
in their privacy reports, so the names are known with sample-level DP on the plain path,
and are ``None`` otherwise (without DP no report names its site; under SecAgg+ which masked
updates reach the unmasked sum is decided inside Flower's workflow).

>>> best = BestRound()
>>> best.offer(1, accuracy=0.5, macro_f1=0.4, digest="a"), best.offer(2, accuracy=0.5, macro_f1=0.3, digest="b")
(True, False)
>>> BestRound.from_state(best.to_state()).round
1
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedmm.config import RunConfig
from fedmm.data.schema import MultimodalDataset, Schema
from fedmm.federation.artifacts import RunArtifacts
from fedmm.federation.book import FederationBook
from fedmm.models import ModelRecipe
from fedmm.models.evaluation import Scores, score

__all__ = ["make_central_evaluation", "BestRound", "Participants", "model_digest", "round_fields", "summary_fields", "BEST_STATE"]

BEST_STATE = "best"
"""The key of :class:`BestRound`'s record in the checkpoint's ``state``."""


def make_central_evaluation(
    cfg: RunConfig, test: MultimodalDataset, on_round: Callable[[int, float, float, dict[str, float]], None] | None = None,
    *, tasks_from: Schema | None = None, on_score: Callable[[int, Scores, ArrayRecord], None] | None = None,
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Build the ``evaluate_fn`` for ``Strategy.start``: the global model scored on the held-out set.

    ``on_round(round, loss, accuracy, tasks)`` and ``on_score(round, scores, arrays)`` (the
    whole :class:`~fedmm.models.evaluation.Scores` and the evaluated model) are called with
    each round's result, in that order.
    """
    recipe = ModelRecipe.from_config(cfg)
    test = recipe.prepare(test, tasks_from=tasks_from)
    model = recipe.build(test.schema, seed=cfg.seed)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        result = score(model, test)
        if on_round is not None:
            on_round(server_round, result.loss, result.accuracy, result.tasks)
        if on_score is not None:
            on_score(server_round, result, arrays)
        return MetricRecord({
            "accuracy": result.accuracy, "loss": result.loss, "macro-f1": result.macro_f1,
            **{f"accuracy-{name}": value for name, value in result.tasks.items()},
        })

    return evaluate_fn


def model_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a model's tensors (names, dtypes, shapes, values): the same for a state_dict and its arrays."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        array = np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value))
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass
class BestRound:
    """The round whose global model scored best on the server's held-out set (accuracy, then macro-F1).

    Kept in the checkpoint's ``state`` under :data:`BEST_STATE` so a resumed run keeps it;
    ``digest`` (:func:`model_digest`) identifies the model in ``model-best.pt``.
    """

    round: int | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    digest: str | None = None

    def offer(self, server_round: int, *, accuracy: float, macro_f1: float, digest: str) -> bool:
        """Take this round if it beats the best so far; return whether it did."""
        if self.accuracy is not None and self.macro_f1 is not None and (accuracy, macro_f1) <= (self.accuracy, self.macro_f1):
            return False
        self.round, self.accuracy, self.macro_f1, self.digest = server_round, accuracy, macro_f1, digest
        return True

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    def keep_on_resume(self, artifacts: RunArtifacts, *, checkpoint_round: int, arrays: Mapping[str, np.ndarray]) -> str | None:
        """After a restart: make ``model-best.pt`` hold this record's model; return what was wrong, or None.

        The server writes the checkpoint (with this record) before ``model-best.pt``, so a
        crash between the two leaves a best round that is the checkpoint's own: its model is
        rewritten from the checkpoint. Any other mismatch (a file edited or removed by hand)
        is reported, and the record stays.
        """
        if self.round is None:
            return None
        on_disk = artifacts.load_model(best=True)
        if on_disk is not None and model_digest(on_disk) == self.digest:
            return None
        if self.round == checkpoint_round and model_digest(arrays) == self.digest:
            artifacts.save_model({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, best=True)
            return f"model-best.pt rewritten from the checkpoint of round {checkpoint_round} (the server stopped before writing it)"
        return (f"model-best.pt is {'missing' if on_disk is None else 'not the model of round ' + str(self.round)}; it is replaced when a "
                f"later round beats round {self.round}'s held-out accuracy {self.accuracy:.4f}")

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> BestRound:
        """From a checkpoint's record (a checkpoint of an older fedmm has none: no best yet)."""
        if not state:
            return cls()
        return cls(state.get("round"), state.get("accuracy"), state.get("macro_f1"), state.get("digest"))


class Participants:
    """The names of the sites whose updates a round aggregated, read from a :class:`FederationBook`.

    The plain path (:class:`fedmm.federation.strategy.FedMMAvg`) lists what it aggregated
    (``participants_last_round``): the sites' names under DP, ``node-<id>`` without DP (a site
    names itself only in its privacy report). Otherwise the list is inferred:

    A site names itself in its privacy report, which the book keeps (``site_privacy``); a
    report that changed since the last round (a new ledger entry, more steps) is this
    round's. Take away the sites whose update the book rejected this round, and what is
    left was aggregated; the count is checked against ``sites_last_round``, and anything
    that does not add up gives ``None`` rather than a wrong list. ``None`` too without
    sample-level DP (no report names its site) and under SecAgg+ (dropouts are decided
    inside Flower's workflow, after the reports are read).
    """

    def __init__(self, book: FederationBook, *, dp: bool, secure: bool) -> None:
        self.knowable = dp and not secure
        self._seen = self._reports(book)

    @staticmethod
    def _reports(book: FederationBook) -> dict[str, tuple[Any, ...]]:
        return {site: (p.ledger_seq, p.steps, p.epsilon) for site, p in book.site_privacy.items()}

    def of_round(self, book: FederationBook, server_round: int) -> list[str] | None:
        """The sites aggregated in ``server_round`` (call once a round, after its aggregation), or None."""
        now = self._reports(book)
        changed = sorted(site for site, report in now.items() if self._seen.get(site) != report)
        self._seen = now
        exact = getattr(book, "participants_last_round", None)  # the plain path's own list of what it aggregated
        if exact is not None:
            return sorted(exact)
        if not self.knowable:
            return None
        rejected = set(book.rejected_in(server_round))
        names = [site for site in changed if site not in rejected]
        return names if len(names) == book.sites_last_round else None


def round_fields(scores: Scores, participants: list[str] | None) -> dict[str, Any]:
    """What a round's line of ``metrics.jsonl`` gets from the central evaluation, beyond accuracy and loss."""
    report = scores.report.to_json()
    return {"macro_f1": scores.macro_f1, "per_class": report["per_class"], "confusion": report["confusion"], "participants": participants}


def summary_fields(final: Scores | None, best: BestRound) -> dict[str, Any]:
    """What ``summary.json`` gets: the final model's macro-F1, classes, per-class scores and confusion; the best round."""
    report = final.report.to_json() if final is not None else {}
    return {
        "final_macro_f1": report.get("macro_f1"), "classes": report.get("classes"), "per_class": report.get("per_class"),
        "confusion": report.get("confusion"), "best_round": best.round, "best_accuracy": best.accuracy, "best_macro_f1": best.macro_f1,
    }
