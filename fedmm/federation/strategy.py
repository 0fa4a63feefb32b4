"""The plain (no SecAgg+) federated strategy (the central evaluation is in :mod:`fedmm.federation.central`).

:class:`FedMMAvg` is Flower's FedAvg (weighted by ``num-examples``) that trusts no site:
a site that fails stops the run with its reason (nothing is averaged silently over fewer
sites); before anything is summed, an update is rejected, and counted per reason and per
site, unless it has exactly the global model's tensors, dtypes (never cast) and shapes,
its model layout, finite values, a norm within ``max-update-norm`` (and client-level DP's
clip), a weight in the agreed range (exactly 1 under ``dp=true``, else an integer in
``[1, max-site-weight]``) and well-formed metrics; the accepted updates are combined by
``aggregation`` (FedAvg, or a robust rule of :mod:`fedmm.federation.robust`); a global
model that comes out non-finite stops the run before it is used or saved. The server's
optimizer (``strategy``: FedAvgM, FedAdam, FedYogi, FedAdagrad, and ``server-ema``;
:mod:`fedmm.federation.server_opt`) then takes a step from the aggregate (after the robust
rule, and after the server's noise under client-level DP: post-processing, no privacy
cost), and its output is checked for non-finite values the same way. The privacy
loss is aggregated as a maximum, never an average; each site's privacy report is kept
for the run's artifacts, from every reply (also one rejected, or of a round that then
stops or fails); and with client-level DP the server adds the noise and accounts it.
Secure aggregation runs on Flower's legacy path instead
(:mod:`fedmm.federation.secagg`), with the same :class:`FederationBook`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import cast

import numpy as np
import torch

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmm import protocol
from fedmm.errors import ConfigError, FederationError
from fedmm.federation.book import FederationBook, SitePrivacy
from fedmm.federation.checks import aggregate_train_metrics, check_update, check_weight
from fedmm.federation.robust import Aggregation, aggregate, cast_like, least_updates, update_norm_bound
from fedmm.federation.server_opt import ServerOptimizer, WithServerOptimizer, check_proximal
from fedmm.plan import RunPlan
from fedmm.privacy.client_dp import ClientDPPlan

__all__ = ["FedMMAvg"]


class FedMMAvg(WithServerOptimizer, FedAvg, FederationBook):
    """FedAvg that fails closed on site errors, rejects bad updates and keeps per-site privacy reports.

    With client-level DP the sites send clipped updates (deltas) and this strategy sums them,
    adds the central Gaussian noise and divides by the expected number of sites.
    """

    def __init__(
        self, *, dp: bool, sites: int, layout: str | None = None, min_sites: int = 1,
        reference: Mapping[str, tuple[int, ...]] | None = None, client_dp: ClientDPPlan | None = None,
        max_site_weight: int = 1_000_000, max_update_norm: float | None = None,
        aggregation: Aggregation | str = Aggregation.FEDAVG, malicious_sites: int = 1, server_opt: ServerOptimizer | None = None,
        client_fraction: float = 1.0, seed: int = 0,
    ) -> None:
        FedAvg.__init__(
            self, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=sites, min_available_nodes=sites,
            weighted_by_key=protocol.NUM_EXAMPLES,
            arrayrecord_key=protocol.ARRAYS, configrecord_key=protocol.CONFIG,
            train_metrics_aggr_fn=aggregate_train_metrics,
        )
        FederationBook.__init__(self, dp=dp, min_sites=min_sites, client_dp=client_dp, client_fraction=client_fraction, seed=seed)
        self.layout = layout  # the server model's layout fingerprint; None: not checked
        self.reference = reference  # expected tensors of an update (shapes; dtypes from the global model); None: not checked
        self.max_site_weight = max_site_weight
        self.max_update_norm = max_update_norm  # None: no bound beyond client-level DP's clip
        self.aggregation = Aggregation.parse(str(aggregation))
        self.malicious_sites = malicious_sites
        if self.aggregation is not Aggregation.FEDAVG and client_dp is not None:
            raise ConfigError("aggregation", "a robust rule cannot be combined with client-level DP (its noise is calibrated for a sum)",
                              value=self.aggregation.value, fix="use aggregation='fedavg', or client-dp=false")
        self.least_updates = least_updates(self.aggregation, malicious_sites)
        self._global: dict[str, np.ndarray] | None = None
        self.server_opt = server_opt if server_opt is not None else ServerOptimizer()  # fedavg: the aggregate as it is

    @classmethod
    def from_plan(cls, plan: RunPlan, *, initial: Mapping[str, torch.Tensor], layout: str, learning_rate: float) -> FedMMAvg:
        """The strategy a run's plan asks for: its checks, norm bound and aggregation rule.

        ``initial`` is the global model's state_dict and ``learning_rate`` the sites'
        (``plan.learning_rate(schema)``); ``max-update-norm = auto`` is resolved here, once.
        """
        cfg = plan.config
        reference = {k: tuple(v.shape) for k, v in initial.items() if not cfg.client_dp or v.is_floating_point()}
        parameters = sum(v.numel() for v in initial.values() if v.is_floating_point())
        bound = update_norm_bound(cfg, learning_rate=learning_rate, parameters=parameters)
        server_opt = ServerOptimizer.from_config(cfg)
        check_proximal(cfg, learning_rate)
        log(INFO, "[fedmm] update checks: max-update-norm %.6g%s, weights %s, aggregation %s; %s", bound,
            " (auto)" if cfg.max_update_norm is None else "", "exactly 1 (dp=true)" if cfg.dp else f"in [1, {cfg.max_site_weight}]",
            cfg.aggregation if cfg.aggregation == "fedavg" else f"{cfg.aggregation} (malicious-sites={cfg.malicious_sites})",
            server_opt.describe())
        if cfg.sites is None:  # the server resolves sites=auto from the data before this (RunPlan.with_sites)
            raise ConfigError("sites", "is still auto: nothing here counted the sites", value="auto", fix="set sites to the number of sites, e.g. sites=3")
        return cls(
            dp=cfg.dp, sites=cfg.sites, layout=layout, min_sites=cfg.min_sites, reference=reference, client_dp=plan.client_dp,
            max_site_weight=cfg.max_site_weight, max_update_norm=None if cfg.client_dp and cfg.max_update_norm is None else bound,
            aggregation=cfg.aggregation, malicious_sites=cfg.malicious_sites, server_opt=server_opt,
            client_fraction=cfg.client_fraction, seed=cfg.seed,
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """FedAvg's train messages to the sampled sites, minus those that have refused."""
        server_round += self.round_offset
        self._global = {k: v.numpy() for k, v in arrays.items()}
        self.round_report = {"round": server_round}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        chosen = set(self.sample_nodes(server_round, (m.metadata.dst_node_id for m in messages)))
        asked = [m for m in messages if m.metadata.dst_node_id in chosen]
        for message in asked:  # FedAvg's messages share one RecordDict: a node's own entry goes in a copy
            enrolled = self.enrolled_config(message.metadata.dst_node_id)
            if enrolled:
                content = RecordDict(dict(message.content.items()))
                content[protocol.CONFIG] = ConfigRecord({**message.content.config_records[protocol.CONFIG], **enrolled})
                message.content = content
        return asked

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the acceptable updates, or raise :class:`FederationError` if a site failed or none replied."""
        server_round += self.round_offset
        replies = list(replies)
        # First of all, what the sites spent: every report received, whatever becomes of its update.
        answered = [m for m in replies if not m.has_error()]
        unvouched: dict[int, str] = {}  # a borrowed name, a ledger going back, ...: that update is left out
        self.keep_reports(server_round, (
            (m.metadata.src_node_id, m.content.config_records[protocol.PRIVACY]) for m in answered if protocol.PRIVACY in m.content.config_records
        ), on_refused=unvouched.__setitem__)
        # A site lost mid-round (Flower's "Node Unavailable": its heartbeats stopped) is dropped, as under SecAgg+: its
        # local DP holds whatever the others do, and min-sites still applies. Under client-level DP the server's noise
        # was calibrated for the round's sample, so the run stops. Any other failed reply fails the run, with its reason.
        lost = [m for m in replies if m.has_error() and m.error.code == ErrorCode.NODE_UNAVAILABLE]
        failed = [m for m in replies if m.has_error() and m.error.code != ErrorCode.NODE_UNAVAILABLE]
        if failed or (lost and self.client_dp is not None):
            reasons = "; ".join(f"node {m.metadata.src_node_id}: {m.error.reason}" for m in failed + lost)
            why = " (client-level DP: the server's noise was calibrated for every sampled site)" if not failed else ""
            raise FederationError(f"round {server_round}: {len(failed) + len(lost)} of {len(replies)} sites failed{why} ({reasons})")
        if lost:
            self.round_report["dropped"] = len(lost)
            replies = [m for m in replies if not m.has_error()]
        if not replies:
            raise FederationError(f"round {server_round}: no site replied; check that the sites are connected")
        for reply in replies:
            refusal = reply.content.config_records.get(protocol.REFUSED)
            if refusal is not None:
                site = str(refusal.get(protocol.SITE, f"node-{reply.metadata.src_node_id}"))
                self.note_refusal(server_round, reply.metadata.src_node_id, site, str(refusal.get(protocol.REASON, "no reason given")),
                                  spent=refusal.get(protocol.EPSILON), budget=refusal.get(protocol.BUDGET))
        for node, why in unvouched.items():
            self.reject(server_round, node, "identity", why)
        accepted = [
            m for m in replies
            if protocol.REFUSED not in m.content.config_records and m.metadata.src_node_id not in unvouched and self._acceptable(server_round, m)
        ]
        names = [f"node-{m.metadata.src_node_id}" for m in accepted]  # without DP a site does not name itself
        if self.dp:  # an update without its privacy report is not aggregated: the run stops
            names = [SitePrivacy.from_record(m.content, node=m.metadata.src_node_id).site for m in accepted]
        self.require_sites(server_round, len(accepted))
        arrays: ArrayRecord | None
        metrics: MetricRecord | None
        if self.client_dp is not None:
            arrays, metrics = self._aggregate_private(server_round, accepted)
        else:
            arrays, metrics = self._aggregate_plain(server_round, accepted)
        aggregated = {k: v.numpy() for k, v in arrays.items()}
        self.check_global(server_round, aggregated)
        if self._global is not None and not self.server_opt.identity:
            stepped = self.server_opt.apply(self._global, aggregated)
            self.check_global(server_round, stepped)  # the optimizer's output is the global model: checked the same way
            arrays = ArrayRecord({k: torch.from_numpy(v) for k, v in stepped.items()})
        self.sites_last_round = len(accepted)
        self.participants_last_round = names  # read by the central evaluation into metrics.jsonl
        self.latest_arrays = arrays
        self.last_train_metrics = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
        return arrays, metrics

    def _expected(self) -> Mapping[str, np.ndarray | tuple[int, ...]] | None:
        """What an update must hold: the global model's tensors (dtype and shape) of the reference's names."""
        if self._global is None:
            return self.reference
        return {k: self._global[k] for k in (self.reference if self.reference is not None else self._global)}

    def _acceptable(self, server_round: int, reply: Message) -> bool:
        node, content = reply.metadata.src_node_id, reply.content
        privacy = content.config_records.get(protocol.PRIVACY)
        site = str(privacy[protocol.SITE]) if privacy is not None and protocol.SITE in privacy else None
        problem: tuple[str, str] | None = None
        record = content.config_records.get(protocol.MODEL)
        got = record.get(protocol.LAYOUT) if record is not None else None
        tensors = content.array_records.get(protocol.ARRAYS)
        metrics = content.metric_records.get(protocol.METRICS)
        if self.layout is not None and got != self.layout:
            problem = ("layout", f"model layout {got!r}, the server's model has {self.layout!r}. Fix: run the same fedmm version and "
                       "model, data modalities and preprocessing keys at every site")
        elif tensors is None or len(content.array_records) != 1:
            problem = ("tensors", f"{len(content.array_records)} array record(s); exactly one, '{protocol.ARRAYS}', is agreed")
        elif metrics is None:
            problem = ("metrics", f"no '{protocol.METRICS}' record in the reply")
        else:
            problem = check_weight(metrics.get(protocol.NUM_EXAMPLES), dp=self.dp, max_weight=self.max_site_weight) or self._metrics_problem(metrics)
        if problem is None:
            assert tensors is not None
            sends_weights = self.client_dp is None
            problem = check_update(
                {k: v.numpy() for k, v in tensors.items()}, self._expected(), clip_norm=self.client_dp.clip_norm if self.client_dp else None,
                max_norm=self.max_update_norm if (self._global is not None or not sends_weights) else None,
                base=self._global if sends_weights else None,
            )
        if problem is not None:
            self.reject(server_round, node, *problem, site=site)
            return False
        return True

    @staticmethod
    def _metrics_problem(metrics: MetricRecord) -> tuple[str, str] | None:
        """A reply's epsilon (required) and training loss (if sent) must be finite numbers."""
        for key in (protocol.EPSILON, protocol.TRAIN_LOSS):
            value = metrics.get(key)
            if key == protocol.TRAIN_LOSS and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                return "metrics", f"metric '{key}' is {value!r}; a finite number is agreed"
        return None

    def _aggregate_plain(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord]:
        """The accepted weights, combined by the run's rule, in the global model's names, order and dtypes."""
        updates = [{k: v.numpy() for k, v in m.content.array_records[protocol.ARRAYS].items()} for m in replies]
        weights = [cast(int, m.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]) for m in replies]  # checked integers
        like = self._global if self._global is not None else updates[0]
        combined, used = aggregate(self.aggregation, [{k: u[k] for k in like} for u in updates], weights, malicious=self.malicious_sites)
        if self.aggregation is Aggregation.KRUM:
            log(INFO, "[fedmm] round %d: krum chose the update of node %d", server_round, replies[used[0]].metadata.src_node_id)
        arrays = ArrayRecord({k: torch.from_numpy(cast_like(combined[k], like[k].dtype)) for k in like})
        return arrays, aggregate_train_metrics([m.content for m in replies], protocol.NUM_EXAMPLES)

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

