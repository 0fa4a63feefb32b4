"""Secure aggregation with Flower's SecAgg+ (``secure-aggregation = true``).

Flower 1.42 runs SecAgg+ only on its legacy workflow path, so this module puts fedmm's
server on that path rather than writing a protocol of its own:

- :class:`SecureFedMM` is a legacy ``flwr.server.strategy.Strategy`` with the same
  bookkeeping as :class:`fedmm.federation.FedMMAvg` (:class:`FederationBook`: privacy
  reports as a maximum, refusals, min-sites, client-level DP and its accountant). Each
  site's privacy report is kept as its masked vector arrives, before any check.
- :class:`FedMMSecAggPlus` is Flower's :class:`SecAggPlusWorkflow` with two additions: it
  rejects (and counts) masked vectors whose shapes are not the model's before they are
  summed, and it stops the run with a clear error when a round cannot be unmasked (more
  sites dropped than the reconstruction threshold allows); Flower's own workflow would log
  "Secure aggregation halted" and go on to the next round with the old model.
- :func:`secure_fit` is the site's side, called inside Flower's ``secaggplus_mod``.

What the server holds: each site's public keys, encrypted key shares it cannot read, one
masked vector per site (uniformly random to it), the shares needed to remove the masks of
the sum, each site's metrics (loss, epsilon, and its ``num-examples``, which are FedAvg's
weights), and the weighted average of the updates. Never one site's update in the clear.

What cannot be checked under SecAgg: the values inside a masked vector, and the weight a
site folds into it. A site's update norm, its finiteness and its client-level clip are
checked by the site itself before masking (:func:`fedmm.secure.update.prepare_update`).
The server checks, per site and before anything is summed, the shapes and the integer
dtype of each masked vector and the weight the site declares in its plain metrics (exactly
1 under DP, else an integer in ``[1, max-site-weight]``; a claim it cannot bind to the
masked weight), rejecting and counting the site (it then counts as dropped); after
unmasking, that the aggregate is finite (a summed weight of zero makes it infinite), that the mean
update is within ``max-update-norm`` (a mean of updates within the bound is within it; not
checked under distributed client-level noise, whose shares are in the sum) and that the new
global model is finite. A failure after unmasking cannot be traced to a site: the round is
not applied and the run stops. A malicious site could still send any values inside the
quantisation range: each weighted value is bounded by ``secagg-clip-range``, so its pull on
the average is bounded, not removed. Robust rules (``aggregation``) need each update and
are refused with secure aggregation.

The server's optimizer (``strategy``, ``server-ema``: :mod:`fedmm.federation.server_opt`)
steps from the unmasked aggregate (after the server's noise under client-level DP), as on
the plain path: it reads only the sum SecAgg+ reveals anyway, so it changes nothing of what
the server sees and costs no privacy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.common import Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Status, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data.schema import Schema
from fedmm.errors import FederationError, SitesExhausted
from fedmm.federation.book import FederationBook
from fedmm.federation.checks import check_update, check_weight
from fedmm.federation.robust import update_norm_bound
from fedmm.federation.server_opt import ServerOptimizer, WithServerOptimizer, check_proximal
from fedmm.plan import RunPlan
from fedmm.privacy.client_dp import ClientDPPlan, update_norm
from fedmm.secure.params import SecAggParams

__all__ = ["SecureFedMM", "FedMMSecAggPlus", "secagg_params", "make_workflow"]

Scalar = bool | bytes | float | int | str
_FITRES_METRICS = "fitres.metrics"  # where Flower's legacy FitRes keeps a reply's metrics


def _fraction_or_count(value: float) -> int | float:
    """Flower reads a float as a fraction and an int as a count."""
    return float(value) if value <= 1 else int(value)


def make_workflow(cfg: RunConfig, strategy: SecureFedMM) -> FedMMSecAggPlus:
    """The SecAgg+ fit workflow for ``cfg`` (weights of 1 under sample- or client-level DP, else num-examples)."""
    return FedMMSecAggPlus(
        strategy,
        num_shares=_fraction_or_count(cfg.secagg_shares),
        reconstruction_threshold=_fraction_or_count(cfg.secagg_threshold),
        max_weight=1.0 if cfg.client_dp or cfg.dp else cfg.secagg_max_weight,  # weights of 1 under DP (no exact record counts leave a site)
        clipping_range=cfg.secagg_clip_range,
        timeout=cfg.secagg_timeout or None,
    )


def secagg_params(context: Context) -> SecAggParams:
    """The quantisation settings the protocol's setup stage left in this site's node state."""
    return SecAggParams.from_state(context.state.config_records.get(RECORD_KEY_STATE))


class SecureFedMM(WithServerOptimizer, Strategy, FederationBook):
    """FedAvg of site updates under SecAgg+: global model + the (weighted) mean update.

    Parameters
    ----------
    cfg
        The run's configuration.
    initial
        The global model's initial tensors (state_dict order).
    train_config
        Sent to every site with each round (schema, run id, ...).
    evaluate_fn
        Central evaluation, as for ``Strategy.start`` of Flower's new API.
    """

    def __init__(
        self, cfg: RunConfig, *, initial: Mapping[str, np.ndarray], train_config: Mapping[str, Scalar],
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord], layout: str, learning_rate: float | None = None,
    ) -> None:
        FederationBook.__init__(self, dp=cfg.dp, min_sites=cfg.min_sites, client_dp=ClientDPPlan.from_config(cfg), client_fraction=cfg.client_fraction, seed=cfg.seed)
        self.cfg = cfg
        self.names = list(initial)
        self.global_arrays = {k: np.asarray(v) for k, v in initial.items()}
        self.update_names = [k for k, v in self.global_arrays.items() if v.dtype.kind == "f"]
        self.train_config = dict(train_config)
        self.evaluate_fn = evaluate_fn
        self.layout = layout
        self.aggregated_round = 0
        self.threshold = 0  # the round's reconstruction threshold, set by the workflow
        self.wait_timeout = 600
        # The mean update's bound: each site's update is within it, so their mean is. Not with
        # distributed client-level noise (the shares are in the sum); None when it cannot be resolved.
        lr = learning_rate if learning_rate is not None else cfg.learning_rate
        if lr is None and protocol.SCHEMA in self.train_config:  # the fusion's tuned rate for the model the sites train
            lr = RunPlan.from_config(cfg).learning_rate(Schema.from_json(str(self.train_config[protocol.SCHEMA])))
        params = sum(int(self.global_arrays[k].size) for k in self.update_names)
        resolvable = cfg.max_update_norm is not None or cfg.client_dp or lr is not None
        distributed = self.client_dp is not None and self.client_dp.distributed
        self.max_update_norm = update_norm_bound(cfg, learning_rate=lr or 0.0, parameters=params) if resolvable and not distributed else None
        if lr is not None:
            check_proximal(cfg, lr)
        self.server_opt = ServerOptimizer.from_config(cfg)
        log(INFO, "[fedmm] secure aggregation: %s", self.server_opt.describe())

    # ------------------------------------------------------------ the legacy Strategy API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([self.global_arrays[k] for k in self.names])

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.round_offset
        # The first round waits for every site; later ones go on with the sites still connected
        # (a lost site is SecAgg+'s dropout case). num_available() refreshes Flower's node list now.
        wanted = (self.cfg.sites or 2) if server_round == self.round_offset + 1 else max(2, self.min_sites)  # sites: resolved by the server
        if client_manager.num_available() < wanted and not client_manager.wait_for(wanted, timeout=self.wait_timeout):
            raise FederationError(
                f"round {server_round}: {client_manager.num_available()} site(s) connected within {self.wait_timeout} s, "
                f"{wanted} needed. Fix: start every site (sites={self.cfg.sites}), or lower 'sites'"
            )
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        chosen = self.sample_nodes(server_round, proxies, at_least=2)
        if len(chosen) < 2:
            raise SitesExhausted(f"round {server_round}: {len(chosen)} site(s) left to ask; secure aggregation needs at least 2. The run stops here")
        config: dict[str, Scalar] = {
            **self.train_config, protocol.SERVER_ROUND: server_round, protocol.TENSOR_NAMES: json.dumps(self.names),
            protocol.LAYOUT: self.layout,
        }
        self.round_report["asked"] = len(chosen)
        return [(proxies[n], FitIns(parameters, {**config, **self.enrolled_config(n)})) for n in chosen]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Apply the unmasked mean update; every result carries the same aggregate, and its own metrics."""
        server_round += self.round_offset
        self.aggregated_round = server_round
        # What the sites spent, before any check can stop the round (kept already as the masked vectors came in).
        self.keep_reports(server_round, ((proxy.node_id, res.metrics) for proxy, res in results if protocol.REASON not in res.metrics))
        dropped = self.round_report.get("asked", len(results)) - len(results)
        self.round_report["dropped"] = dropped
        if dropped:
            log(WARNING, "[fedmm] round %d: %d site(s) dropped out or were rejected during secure aggregation: %s", server_round, dropped,
                "; ".join(str(f) for f in failures) or "no reply")
        taking_part = []
        for proxy, res in results:
            metrics = res.metrics
            if protocol.REASON in metrics:
                continue  # a refusal: noted before unmasking (_CheckingGrid)
            if metrics.get(protocol.LAYOUT) != self.layout:
                raise FederationError(
                    f"round {server_round}: node {proxy.node_id} trained model layout {metrics.get(protocol.LAYOUT)!r}, the server's is "
                    f"{self.layout!r}. Under secure aggregation its masked update is already in the sum, so the round cannot be used. "
                    "Fix: run the same fedmm version and model, data modalities and preprocessing keys at every site"
                )
            taking_part.append((proxy, res))
        if not taking_part and self.refused_nodes:
            raise SitesExhausted(f"round {server_round}: every site asked has refused (budget or policy). The run stops here")
        self.require_sites(server_round, len(taking_part))
        mean = parameters_to_ndarrays(results[0][1].parameters)
        shapes = {k: self.global_arrays[k].shape for k in self.update_names}
        aggregate = dict(zip(self.update_names, mean))
        problem = check_update(aggregate, shapes) if len(mean) == len(self.update_names) else ("tensors", f"{len(mean)} tensors, expected {len(self.update_names)}")
        if problem is None and self.max_update_norm is not None and update_norm(aggregate) > self.max_update_norm * (1 + 1e-4):
            problem = ("norm", f"the mean update's L2 norm {update_norm(aggregate):.6g} is above max-update-norm {self.max_update_norm:g}, "
                       "so some site's update was beyond it (which one, the server cannot see)")
        if problem is not None:
            hint = (" (a summed weight of zero, from a site that masked a weight cancelling the others', gives this too)"
                    if problem[0] == "non-finite" else "")
            raise FederationError(
                f"round {server_round}: the unmasked aggregate is unusable ({problem[1]}){hint}; which site caused it the server "
                "cannot see. The round is not applied and the run stops"
            )
        if self.client_dp is not None:
            # Every result was weighted 1 (refusals send a zero update, and their noise share):
            # the mean times the number of results is the sum.
            summed = {k: v.astype(np.float64) * len(results) for k, v in aggregate.items()}
            step = self.privatise(server_round, summed, updates=len(results), noise_parties=self.threshold)
        else:
            step = {k: v.astype(np.float64) for k, v in aggregate.items()}
        updated = {k: (self.global_arrays[k].astype(np.float64) + v).astype(self.global_arrays[k].dtype) for k, v in step.items()}
        self.check_global(server_round, updated)
        if not self.server_opt.identity:  # integer buffers are not in the sum: they keep their value
            stepped = self.server_opt.apply(self.global_arrays, {**self.global_arrays, **updated})
            updated = {k: stepped[k] for k in updated}
            self.check_global(server_round, updated)
        self.global_arrays.update(updated)
        self.sites_last_round = len(taking_part)
        self.latest_arrays = ArrayRecord({k: torch.from_numpy(self.global_arrays[k].copy()) for k in self.names})
        # Under DP the sites send no training loss (outside DP-SGD's guarantee): then none is reported.
        losses = [(float(cast(float, res.metrics.get(protocol.NUM_EXAMPLES, 1))), float(cast(float, res.metrics[protocol.TRAIN_LOSS])))
                  for _, res in taking_part if protocol.TRAIN_LOSS in res.metrics]
        total = sum(n for n, _ in losses)
        self.last_train_metrics = {protocol.TRAIN_LOSS: sum(n * loss for n, loss in losses) / total} if total and len(losses) == len(taking_part) else {}
        if self.dp:
            self.last_train_metrics[protocol.EPSILON] = max(p.epsilon for p in self.site_privacy.values())
        return ndarrays_to_parameters([self.global_arrays[k] for k in self.names]), dict(self.last_train_metrics)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # evaluation is central (the server's held-out set)

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        server_round += self.round_offset
        arrays = ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in zip(self.names, parameters_to_ndarrays(parameters))})
        metrics = self.evaluate_fn(server_round, arrays)
        return float(cast(float, metrics["loss"])), {k: cast(float, v) for k, v in metrics.items()}


class _CheckingGrid:
    """A view of the Grid that drops masked vectors of the wrong shape before they are summed.

    A dropped reply is what a site that went away looks like to SecAgg+: its pairwise masks
    are reconstructed from the other sites' shares and the round goes on without it.
    """

    def __init__(self, grid: Grid, strategy: SecureFedMM) -> None:
        self._grid = grid
        self._strategy = strategy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        strategy = self._strategy
        server_round = int(strategy.round_report.get("round", 0))
        expected = [(1,)] + [strategy.global_arrays[k].shape for k in strategy.update_names]
        kept, masked = [], False
        reports: list[tuple[int, Mapping[str, Any]]] = []
        for reply in replies:
            record = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
            if record is not None and Key.MASKED_PARAMETERS in record:
                masked = True
                metrics: Mapping[str, Any] = reply.content.config_records.get(_FITRES_METRICS) or {}
                if protocol.REASON not in metrics:
                    reports.append((reply.metadata.src_node_id, metrics))
                problem = self._problem(record, metrics, expected)
                if problem is not None:
                    site = str(metrics[protocol.SITE]) if protocol.SITE in metrics else None
                    strategy.reject(server_round, reply.metadata.src_node_id, *problem, site=site)
                    continue
            kept.append(reply)
        if masked:
            # The site trained (and spent its budget) before masking: its report is kept even if its
            # vector was rejected above, the round stops below, or it can never be unmasked.
            strategy.keep_reports(server_round, reports)
            self._check_contributors(server_round, kept)
        return kept

    def _problem(self, record: Mapping[str, Any], metrics: Mapping[str, Any], expected: Sequence[tuple[int, ...]]) -> tuple[str, str] | None:
        """Why a masked vector is left out before the sum: its shapes, its dtype, its declared weight."""
        vectors = [bytes_to_ndarray(cast(bytes, b)) for b in cast(list[bytes], record[Key.MASKED_PARAMETERS])]
        shapes = [v.shape for v in vectors]
        if shapes != expected:
            return "shape", f"masked vector shapes {shapes[:4]}..., expected {expected[:4]}..."
        odd = sorted({str(v.dtype) for v in vectors if v.dtype.kind not in "iu"})
        if odd:
            return "dtype", f"masked vector of dtype {odd}; SecAgg+ masks integers (the quantised update), so it cannot be unmasked"
        if protocol.REASON in metrics:
            return None  # a refusal: its zero update carries weight 0 (or 1 with its noise share)
        cfg = self._strategy.cfg
        return check_weight(metrics.get(protocol.NUM_EXAMPLES), dp=cfg.dp, max_weight=cfg.max_site_weight)

    def _check_contributors(self, server_round: int, replies: list[Message]) -> None:
        """Before anything is unmasked: stop if too few sites actually trained.

        Sites that refuse send a zero update (so the protocol goes on without reconstructing
        their masks) and say so in their plain metrics. Were only one site's update left in
        the sum, unmasking would hand it to the server in the clear: the round stops here,
        with the masks never removed.
        """
        strategy = self._strategy
        contributors = 0
        for reply in replies:
            metrics: Mapping[str, Any] = reply.content.config_records.get(_FITRES_METRICS) or {}
            if protocol.REASON in metrics:
                site = str(metrics.get(protocol.SITE, reply.metadata.src_node_id))
                strategy.note_refusal(server_round, reply.metadata.src_node_id, site, str(metrics[protocol.REASON]),
                                      spent=metrics.get(protocol.EPSILON), budget=metrics.get(protocol.BUDGET))
            else:
                contributors += 1
        needed = max(2, strategy.min_sites)
        if contributors < needed:
            raise SitesExhausted(
                f"round {server_round}: {contributors} site(s) trained and sent a masked update; secure aggregation needs at "
                f"least {needed} (min-sites={strategy.min_sites}) so that no single update can be unmasked. The masks were not "
                f"removed; the run stops here ({len(strategy.refused_nodes)} site(s) have refused: budget or policy)"
            )


class FedMMSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow that checks masked vectors' shapes and fails a round it cannot unmask."""

    def __init__(self, strategy: SecureFedMM, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.strategy = strategy

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        self.strategy.threshold = state.threshold
        return ok and self._forget_unshared(state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        return super().share_keys_stage(grid, context, state) and self._forget_unshared(state)

    def _forget_unshared(self, state: Any) -> bool:
        """Leave out sites lost before they shared their secrets.

        A site that did not answer the setup or key-sharing stage has shared no secret, and
        no other site masks its update with it. Flower's workflow would still ask for its
        shares when unmasking and fail the round; it is simply not part of this round.
        """
        answered = set(state.active_node_ids)
        if state.sampled_node_ids - answered:
            state.sampled_node_ids = answered
            state.nid_to_neighbours = {n: nbrs & answered for n, nbrs in state.nid_to_neighbours.items() if n in answered}
            return self._check_threshold(state)
        return True

    def __call__(self, grid: Grid, context: Context) -> None:
        assert isinstance(context, LegacyContext)
        current = cast(int, context.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND]) + self.strategy.round_offset
        self.strategy.round_report = {"round": current}
        super().__call__(_CheckingGrid(grid, self.strategy), context)  # type: ignore[arg-type]
        if self.strategy.aggregated_round != current:
            report = self.strategy.round_report
            raise FederationError(
                f"round {current}: secure aggregation could not finish: of {report.get('asked', '?')} sites asked, too few stayed "
                f"to reach the reconstruction threshold ({self.strategy.threshold} shares per site; secagg-threshold="
                f"{self.strategy.cfg.secagg_threshold:g}), so the sum cannot be unmasked and no update is applied. "
                "Fix: bring the sites back, or lower secagg-threshold (less protection against a curious server)"
            )
        log(INFO, "[fedmm] round %d: secure aggregation of %d update(s) done", current, self.strategy.sites_last_round)


def secure_fit_reply(
    *, arrays: list[np.ndarray], weight: float, metrics: Mapping[str, Scalar],
) -> FitRes:
    """The legacy FitRes Flower's secaggplus_mod masks: the update, its weight, and plain metrics."""
    return FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(arrays), num_examples=int(weight), metrics=dict(metrics))
