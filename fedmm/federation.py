"""The server's side of a federation, testable without a running Flower server.

:class:`FedMMAvg` is Flower's FedAvg (weighted by ``num-examples``) with three
changes: a site that fails stops the run with its reason (nothing is averaged
silently over fewer sites), the privacy loss is aggregated as a maximum, never
an average, and each site's privacy report is kept for the run's artifacts.
"""

from __future__ import annotations

import math
from logging import INFO
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data.schema import MultimodalDataset, Schema
from fedmm.errors import FederationError, SitesExhausted
from fedmm.privacy.accounting import PrivacyReport
from fedmm.models import ModelRecipe
from fedmm.training import evaluate, task_accuracies

__all__ = ["SitePrivacy", "FedMMAvg", "aggregate_train_metrics", "make_central_evaluation"]


@dataclass(frozen=True, kw_only=True)
class SitePrivacy(PrivacyReport):
    """One site's cumulative privacy loss as it reported it after a round."""

    site: str
    epsilon_budget: float | None = None  # the site's own lifetime budget (from its ledger)
    ledger_seq: int | None = None  # the site's ledger head after its last update: a witness for audits
    ledger_hash: str | None = None
    refused: str | None = None  # why the site stopped taking part, if it did

    @classmethod
    def from_record(cls, content: RecordDict, *, node: int) -> SitePrivacy:
        """Read and check the privacy ConfigRecord of node ``node``'s reply.

        Raises
        ------
        FederationError
            When the record is missing, or a value is missing, of the wrong type or not finite.
        """
        rec = content.config_records.get(protocol.PRIVACY)
        if rec is None:
            raise FederationError(f"node {node} sent no '{protocol.PRIVACY}' record although dp=true; is it running fedmm's ClientApp?")

        def number(key: str) -> float:
            value = rec.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FederationError(f"node {node}: privacy value '{key}' is {value!r}, expected a finite number")
            return float(value)

        return cls(
            site=str(rec.get(protocol.SITE, f"node-{node}")), epsilon=number(protocol.EPSILON), delta=number(protocol.DELTA),
            accountant=str(rec.get(protocol.ACCOUNTANT, "unknown")), noise_multiplier=number(protocol.NOISE_MULTIPLIER),
            sample_rate=number(protocol.SAMPLE_RATE), steps=int(number(protocol.STEPS)),
            epsilon_budget=number(protocol.BUDGET) if protocol.BUDGET in rec else None,
            ledger_seq=int(number(protocol.LEDGER_SEQ)) if protocol.LEDGER_SEQ in rec else None,
            ledger_hash=str(rec[protocol.LEDGER_HASH]) if protocol.LEDGER_HASH in rec else None,
        )


def aggregate_train_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Average the training loss weighted by examples; take the maximum epsilon.

    >>> from flwr.app import MetricRecord, RecordDict
    >>> a = RecordDict({"metrics": MetricRecord({"num-examples": 1, "train-loss": 1.0, "epsilon": 2.0})})
    >>> b = RecordDict({"metrics": MetricRecord({"num-examples": 3, "train-loss": 3.0, "epsilon": 5.0})})
    >>> dict(aggregate_train_metrics([a, b], "num-examples"))
    {'num-examples': 4, 'train-loss': 2.5, 'epsilon': 5.0}
    """
    metrics = [rec.metric_records[protocol.METRICS] for rec in records]

    def number(record: MetricRecord, key: str) -> float:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FederationError(f"a site reported metric '{key}' = {value!r}; expected a finite number")
        return float(value)

    weights = [number(m, weighting_metric_name) for m in metrics]
    total = sum(weights)
    return MetricRecord(
        {
            protocol.NUM_EXAMPLES: int(total),
            protocol.TRAIN_LOSS: sum(w * number(m, protocol.TRAIN_LOSS) for w, m in zip(weights, metrics)) / total,
            protocol.EPSILON: max(number(m, protocol.EPSILON) for m in metrics),
        }
    )


class FedMMAvg(FedAvg):
    """FedAvg that fails closed on site errors and keeps per-site privacy reports."""

    def __init__(self, *, dp: bool, sites: int, layout: str | None = None, min_sites: int = 1) -> None:
        super().__init__(
            fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=sites, min_available_nodes=sites,
            weighted_by_key=protocol.NUM_EXAMPLES,
            arrayrecord_key=protocol.ARRAYS, configrecord_key=protocol.CONFIG,
            train_metrics_aggr_fn=aggregate_train_metrics,
        )
        self.dp = dp
        self.layout = layout  # the server model's layout fingerprint; None: not checked
        self.site_privacy: dict[str, SitePrivacy] = {}
        self.last_train_metrics: dict[str, float] = {}
        self.sites_last_round: int = 0
        self.min_sites = min_sites
        self.refused_nodes: set[int] = set()  # sites that refused a round (budget or policy): not asked again
        self.latest_arrays: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """FedAvg's train messages, minus the sites that have refused (they would only refuse again)."""
        return [m for m in super().configure_train(server_round, arrays, config, grid) if m.metadata.dst_node_id not in self.refused_nodes]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate, or raise :class:`FederationError` if any site failed or none replied."""
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
            raise FederationError(f"round {server_round}: {len(failed)} of {len(replies)} sites failed ({reasons})")
        if not replies:
            raise FederationError(f"round {server_round}: no site replied; check that the sites are connected")
        refusals = [m for m in replies if protocol.REFUSED in m.content.config_records]
        replies = [m for m in replies if protocol.REFUSED not in m.content.config_records]
        for reply in refusals:
            refusal = reply.content.config_records[protocol.REFUSED]
            site = str(refusal.get(protocol.SITE, f"node-{reply.metadata.src_node_id}"))
            reason = str(refusal.get(protocol.REASON, "no reason given"))
            self.refused_nodes.add(reply.metadata.src_node_id)
            known = self.site_privacy.get(site)
            if known is not None:
                self.site_privacy[site] = dataclasses.replace(known, refused=reason)
            log(INFO, "[fedmm] round %d: %s", server_round, reason)
        if len(replies) < self.min_sites:
            raise SitesExhausted(
                f"round {server_round}: {len(replies)} site(s) sent an update, fewer than min-sites={self.min_sites}; "
                f"{len(self.refused_nodes)} site(s) have refused (budget or policy). The run stops here"
            )
        if self.layout is not None:
            for reply in replies:
                record = reply.content.config_records.get(protocol.MODEL)
                got = record.get(protocol.LAYOUT) if record is not None else None
                if got != self.layout:
                    raise FederationError(
                        f"round {server_round}: node {reply.metadata.src_node_id} sent an update with model layout {got!r}, "
                        f"the server's model has {self.layout!r}; refusing to average mismatched weights. "
                        "Fix: run the same fedmm version and model, data modalities and preprocessing keys at every site"
                    )
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or metrics is None:
            raise FederationError(f"round {server_round}: the replies could not be aggregated (see the log above)")
        for reply in replies:
            if self.dp:
                report = SitePrivacy.from_record(reply.content, node=reply.metadata.src_node_id)
                self.site_privacy[report.site] = report
        self.sites_last_round = len(replies)
        self.latest_arrays = arrays
        self.last_train_metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        return arrays, metrics

    @property
    def max_epsilon(self) -> float | None:
        """The federation's privacy loss: the largest epsilon of any site (None without DP)."""
        return max((p.epsilon for p in self.site_privacy.values()), default=None) if self.dp else None


def make_central_evaluation(
    cfg: RunConfig, test: MultimodalDataset, on_round: Callable[[int, float, float, dict[str, float]], None],
    *, tasks_from: Schema | None = None,
) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Build the ``evaluate_fn`` for ``Strategy.start``: accuracy and loss on the held-out set."""
    recipe = ModelRecipe.from_config(cfg)
    test = recipe.prepare(test, tasks_from=tasks_from)
    model = recipe.build(test.schema, seed=cfg.seed)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, test)
        tasks = task_accuracies(model, test)
        on_round(server_round, loss, accuracy, tasks)
        return MetricRecord({"accuracy": accuracy, "loss": loss, **{f"accuracy-{name}": value for name, value in tasks.items()}})

    return evaluate_fn

