"""The plain (no SecAgg+) federated strategy and the server's central evaluation.

:class:`FedMMAvg` is Flower's FedAvg (weighted by ``num-examples``) with these
changes: a site that fails stops the run with its reason (nothing is averaged
silently over fewer sites); an update that is not finite, has other tensors or
shapes than the global model, another model layout, or (client-level DP) a norm
beyond the agreed clip is rejected and counted; the privacy loss is aggregated
as a maximum, never an average; each site's privacy report is kept for the run's
artifacts, from every reply (also one rejected, or of a round that then stops or
fails); and with client-level DP the server adds the noise and accounts it.
Secure aggregation runs on Flower's legacy path instead
(:mod:`fedmm.federation.secagg`), with the same :class:`FederationBook`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data.schema import MultimodalDataset, Schema
from fedmm.errors import FederationError
from fedmm.privacy.client_dp import ClientDPPlan
from fedmm.models import ModelRecipe
from fedmm.models.evaluation import evaluate, task_accuracies

__all__ = ["FedMMAvg", "make_central_evaluation"]


from fedmm.federation.book import FederationBook, SitePrivacy, aggregate_train_metrics, check_update

class FedMMAvg(FedAvg, FederationBook):
    """FedAvg that fails closed on site errors, rejects bad updates and keeps per-site privacy reports.

    With client-level DP the sites send clipped updates (deltas) and this strategy sums them,
    adds the central Gaussian noise and divides by the expected number of sites.
    """

    def __init__(
        self, *, dp: bool, sites: int, layout: str | None = None, min_sites: int = 1,
        reference: Mapping[str, tuple[int, ...]] | None = None, client_dp: ClientDPPlan | None = None,
    ) -> None:
        FedAvg.__init__(
            self, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=sites, min_available_nodes=sites,
            weighted_by_key=protocol.NUM_EXAMPLES,
            arrayrecord_key=protocol.ARRAYS, configrecord_key=protocol.CONFIG,
            train_metrics_aggr_fn=aggregate_train_metrics,
        )
        FederationBook.__init__(self, dp=dp, min_sites=min_sites, client_dp=client_dp)
        self.layout = layout  # the server model's layout fingerprint; None: not checked
        self.reference = reference  # expected tensor shapes of an update; None: not checked
        self._global: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """FedAvg's train messages to the sampled sites, minus those that have refused."""
        server_round += self.round_offset
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self.round_report = {"round": server_round}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        chosen = set(self.sample_nodes(server_round, (m.metadata.dst_node_id for m in messages)))
        return [m for m in messages if m.metadata.dst_node_id in chosen]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the acceptable updates, or raise :class:`FederationError` if a site failed or none replied."""
        server_round += self.round_offset
        replies = list(replies)
        # First of all, what the sites spent: every report received, whatever becomes of its update.
        answered = [m for m in replies if not m.has_error()]
        self.keep_reports(server_round, (
            (m.metadata.src_node_id, m.content.config_records[protocol.PRIVACY]) for m in answered if protocol.PRIVACY in m.content.config_records
        ))
        failed = [m for m in replies if m.has_error()]
        if failed:
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed)
            raise FederationError(f"round {server_round}: {len(failed)} of {len(replies)} sites failed ({reasons})")
        if not replies:
            raise FederationError(f"round {server_round}: no site replied; check that the sites are connected")
        for reply in replies:
            refusal = reply.content.config_records.get(protocol.REFUSED)
            if refusal is not None:
                site = str(refusal.get(protocol.SITE, f"node-{reply.metadata.src_node_id}"))
                self.note_refusal(server_round, reply.metadata.src_node_id, site, str(refusal.get(protocol.REASON, "no reason given")))
        accepted = [m for m in replies if protocol.REFUSED not in m.content.config_records and self._acceptable(server_round, m)]
        if self.dp:
            for reply in accepted:  # an update without its privacy report is not aggregated: the run stops
                SitePrivacy.from_record(reply.content, node=reply.metadata.src_node_id)
        self.require_sites(server_round, len(accepted))
        arrays: ArrayRecord | None
        metrics: MetricRecord | None
        if self.client_dp is not None:
            arrays, metrics = self._aggregate_private(server_round, accepted)
        else:
            arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is None or metrics is None:
            raise FederationError(f"round {server_round}: the replies could not be aggregated (see the log above)")
        self.sites_last_round = len(accepted)
        self.latest_arrays = arrays
        self.last_train_metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        return arrays, metrics

    def _acceptable(self, server_round: int, reply: Message) -> bool:
        node = reply.metadata.src_node_id
        if self.layout is not None:
            record = reply.content.config_records.get(protocol.MODEL)
            got = record.get(protocol.LAYOUT) if record is not None else None
            if got != self.layout:
                self.reject(
                    server_round, node, "layout",
                    f"model layout {got!r}, the server's model has {self.layout!r}. Fix: run the same fedmm version and model, "
                    "data modalities and preprocessing keys at every site",
                )
                return False
        tensors = reply.content.array_records.get(protocol.ARRAYS)
        if tensors is None:
            self.reject(server_round, node, "tensors", f"no '{protocol.ARRAYS}' record in the reply")
            return False
        problem = check_update(
            {k: v.numpy() for k, v in tensors.items()}, self.reference, clip_norm=self.client_dp.clip_norm if self.client_dp else None,
        )
        if problem is not None:
            self.reject(server_round, node, *problem)
            return False
        return True

    def _aggregate_private(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """DP-FedAvg: sum the clipped updates, add the noise, average, apply to the global model."""
        assert self._global is not None
        summed: dict[str, np.ndarray] = {}
        for reply in replies:
            for name, value in reply.content.array_records[protocol.ARRAYS].items():
                summed[name] = summed.get(name, 0.0) + value.numpy().astype(np.float64)
        step = self.privatise(server_round, summed, updates=len(replies))
        new = {k: torch.from_numpy((v.astype(np.float64) + step[k]).astype(v.dtype) if k in step else v.copy()) for k, v in self._global.items()}
        return ArrayRecord(new), aggregate_train_metrics([m.content for m in replies], protocol.NUM_EXAMPLES)


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

