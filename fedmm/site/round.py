"""One data site's round, testable without Flower.

``check budget -> train -> record the spend -> return the update``. The
ClientApp only translates Flower messages to and from :func:`train_round`.
With ``sensor-norm=site`` under DP the first round of a run also releases the site's
noisy sensor statistics: checked with the round against the budget, recorded in the
ledger, then used (``check budget -> record the statistics -> standardise -> train ...``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import weakref
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedmm.config import RunConfig
from fedmm.data.augment import Augmenter
from fedmm.data.normalise import SensorNorm, SiteStatistics, noisy_site_statistics, site_columns
from fedmm.data.schema import ModalityKind, MultimodalDataset, Schema
from fedmm.errors import BudgetExceededError, FederationError, PrivacyError
from fedmm.privacy.accounting import PrivacyEvent, PrivacyReport, SiteAccountant, calibrate_noise_multiplier
from fedmm.privacy.ledger import SITE_STATS_MECHANISM, CarriedSpend, LedgerEntry, PrivacyLedger
from fedmm.privacy.policy import SitePolicy
from fedmm.plan import RunPlan, batch_size
from fedmm.site.data import class_weights
from fedmm.site.training import DPSettings, poisson_steps_per_epoch, scheduled_learning_rate, steps_per_epoch, train

__all__ = ["SitePlan", "SiteState", "SiteUpdate", "data_digest", "plan_site", "stats_event", "train_round"]

logger = logging.getLogger(__name__)
# Measured (docs/training.md, "The DP GRU sensor encoder"): a DP-SGD site round with sensor-encoder=gru (Opacus
# DPGRU) takes about this many times as long as with the 1-D CNN on the same data and steps, and is no more accurate.
GRU_DP_COST = 14


@dataclass(frozen=True)
class SitePlan:
    """How a site trains under DP for the whole run, fixed before its first round."""

    num_examples: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    planned_epsilon: float
    stats_noise_multiplier: float = 0.0  # sensor-norm=site under DP: the statistics' release the plan counts (0: none)


@dataclass
class SiteState:
    """What a site keeps between rounds: its plan, its accountant, and its noisy sensor statistics (never sent)."""

    plan: SitePlan | None
    accountant: SiteAccountant
    site_stats: SiteStatistics | None = None  # sensor-norm=site under DP: released (and paid for) once a run

    def to_json(self) -> str:
        """Serialise for the node's persistent state."""
        plan = None if self.plan is None else self.plan.__dict__
        stats = None if self.site_stats is None else self.site_stats.to_json()
        return json.dumps({"plan": plan, "accountant": json.loads(self.accountant.to_json()), "site_stats": stats})

    @classmethod
    def from_json(cls, text: str) -> SiteState:
        """Restore a state saved by :meth:`to_json`."""
        data = json.loads(text)
        plan = None if data["plan"] is None else SitePlan(**data["plan"])
        stats = None if data.get("site_stats") is None else SiteStatistics.from_json(data["site_stats"])
        return cls(plan=plan, accountant=SiteAccountant.from_json(json.dumps(data["accountant"])), site_stats=stats)


@dataclass(frozen=True)
class SiteUpdate:
    """What a site sends back after a round."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    privacy: PrivacyReport | None
    ledger_entry: LedgerEntry | None = None  # the spend, durably recorded before this update is returned


def stats_event(cfg: RunConfig) -> PrivacyEvent:
    """The noisy statistics' spend: one Gaussian mechanism (sensitivity 1) with noise ``site-stats-noise``, sample rate 1."""
    return PrivacyEvent(cfg.site_stats_noise, 1.0, 1)


def plan_site(cfg: RunConfig, num_examples: int, *, site_stats: bool | None = None) -> SitePlan:
    """Fix the sample rate, steps and noise multiplier of a site for the whole run.

    With ``noise-multiplier = "auto"`` the noise is calibrated so that after
    ``rounds`` rounds the site's epsilon is at most ``target-epsilon``. ``site_stats``:
    whether the site also releases its noisy sensor statistics this run (``sensor-norm=site``
    under DP; by default read from the config), which the calibration and the planned
    epsilon count.
    """
    if site_stats is None:
        site_stats = cfg.dp and any(mode == "site" for _, mode in SensorNorm.parse(cfg.sensor_norm).modes)
    prior = (stats_event(cfg),) if site_stats else ()
    sample_rate = 1.0 / steps_per_epoch(num_examples, batch_size(cfg))
    steps_per_round = cfg.local_epochs * poisson_steps_per_epoch(num_examples, batch_size(cfg))
    total_steps = cfg.rounds * steps_per_round
    noise = cfg.noise_multiplier
    if noise is None:
        noise = calibrate_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
            sample_rate=sample_rate, steps=total_steps, accountant=cfg.accountant, prior=prior,
        )
    trial = SiteAccountant(cfg.accountant, prior)
    planned = trial.projected_epsilon(cfg.target_delta, noise_multiplier=noise, sample_rate=sample_rate, steps=total_steps) if noise > 0 else float("inf")
    return SitePlan(num_examples, sample_rate, steps_per_round, noise, planned, cfg.site_stats_noise if site_stats else 0.0)


def train_round(
    *,
    cfg: RunConfig,
    site: str,
    data: MultimodalDataset,
    global_weights: Mapping[str, torch.Tensor],
    server_round: int,
    state: SiteState,
    expected_schema: str | None = None,
    policy: SitePolicy | None = None,
    ledger: PrivacyLedger | None = None,
    run_id: str = "",
) -> SiteUpdate:
    """Run one round at one site; ``state`` is updated in place (plan, accountant).

    With a ``policy`` and a ``ledger`` (what the ClientApp always passes), the site's own
    limits hold whatever the server asked: it refuses ``dp=false`` when its policy requires
    DP, noise below its floor, and any round that would take its lifetime epsilon (every
    spend in its ledger, across runs, at its own delta) over its budget. The round's spend is
    appended to the ledger, durably, before the update is returned, and the reported epsilon
    is that lifetime figure.

    Only labelled samples train (and count for DP). ``expected_schema`` is the
    server's model input (:meth:`Schema.to_json`); a site whose data differs fails
    with both schemas named rather than loading mismatched weights.

    Raises
    ------
    FederationError
        When the site's data does not match the server's model input.
    BudgetExceededError
        Before any training, when this round would take the site's epsilon over
        ``target-epsilon`` (the run's plan) or over the site's own budget, or when the
        server asks for less than the site's policy allows.
    """
    if policy is not None and policy.require_dp and not cfg.dp:
        raise BudgetExceededError(
            f"site {site} refuses round {server_round}: its policy requires differential privacy and the run has dp=false. "
            "Fix: run with dp=true (or the site's operator sets require-dp=false)"
        )
    if cfg.dp and policy is not None and batch_size(cfg) < policy.min_batch_size:
        raise BudgetExceededError(
            f"site {site} refuses round {server_round}: batch-size={batch_size(cfg)} is below this site's floor min-batch-size="
            f"{policy.min_batch_size} (the sample rate it reports tells its record count to within a batch). Fix: run with "
            f"batch-size >= {policy.min_batch_size} (or the site's operator lowers min-batch-size)"
        )
    if cfg.dp and (policy is None) != (ledger is None):
        raise PrivacyError(f"site {site}: a site policy needs its ledger and a ledger its policy; got only one")
    if cfg.dp and ledger is not None and policy is not None:
        # Checked before anything that depends on the records: which check refuses first must not tell the server about them.
        carried = ledger.carried or CarriedSpend(0.0, 0.0, "")
        if policy.delta + carried.delta > cfg.target_delta * (1 + 1e-9):
            # The server refuses a report at a weaker delta than the run's (epsilons at different deltas do not
            # compare) and would leave out every update: each round trained would be a spend on no one's record.
            raise BudgetExceededError(
                f"site {site} refuses round {server_round}: it states its lifetime epsilon at delta {policy.delta + carried.delta:g} "
                f"({policy.delta:g} of its own{f' + {carried.delta:g} carried from a ledger lost for good' if carried.delta else ''}), "
                f"weaker than the run's target-delta {cfg.target_delta:g}, which the server holds every report to. "
                + (f"Fix: state the site's own spends at delta <= {cfg.target_delta - carried.delta:g} (its node-config delta; in a "
                   "simulation the sites state theirs at target-delta, so a replaced ledger's carried delta cannot fit), or leave "
                   "this site out of the federation" if carried.delta < cfg.target_delta else
                   f"Fix: leave this site out: its carried delta alone reaches target-delta {cfg.target_delta:g}")
            )
    run_plan = RunPlan.from_config(cfg)
    recipe = run_plan.model
    server_schema = Schema.from_json(expected_schema) if expected_schema is not None else None
    arrays = recipe.prepare(data, tasks_from=server_schema).labelled()
    if expected_schema is not None and expected_schema != arrays.schema.to_json():
        raise FederationError(
            f"site {site}: its data gives the model input {arrays.schema.to_json()}, the server's model expects "
            f"{expected_schema}. Fix: use the same modality columns, preprocessing keys and 'classes' at every site"
        )
    if len(arrays) == 0:
        raise FederationError(f"site {site}: no labelled sample to train on ({data.counts()}). Fix: label some samples, or remove the site")
    model = recipe.build(arrays.schema, seed=cfg.seed)
    model.load_state_dict(dict(global_weights))
    dp = None
    stats_columns = site_columns(data, cfg.sensor_norm) if cfg.dp else ()  # sensor-norm=site under DP (else normalised already)
    if cfg.dp:
        # The noisy statistics are released once a run, before its first training, and checked with this round.
        release = [stats_event(cfg)] if stats_columns and state.site_stats is None else []
        with_stats = " with the release of its sensor statistics" if release else ""
        # The checks below depend on the plan's sample rate and noise, functions of the site's record count: which of
        # them refuses would tell a server probing with its settings that count. The server reads one text for all.
        limits = (f"site {site} refuses round {server_round}{with_stats}: this round would break one of its limits (this run's "
                  f"target-epsilon={cfg.target_epsilon:g}" + (f", its lifetime epsilon-budget={policy.epsilon_budget:g}, or its noise floor "
                  f"min-noise-multiplier={policy.min_noise_multiplier:g}" if policy is not None else "") + "); which one, with the figures, "
                  "is in the site's own log. Fix: plan for more noise, fewer rounds or local-epochs, or a larger target-epsilon")
        if state.plan is None or state.plan.num_examples != len(arrays) or (state.plan.stats_noise_multiplier > 0) != bool(stats_columns):
            try:
                state.plan = plan_site(cfg, len(arrays), site_stats=bool(stats_columns))
            except PrivacyError as err:  # no noise meets target-epsilon at this site's sample rate: a refusal, in the same words
                raise BudgetExceededError(f"site {site} refuses round {server_round}{with_stats}: {err}", public=limits) from None
            if cfg.sensor_encoder == "gru" and any(m.kind is ModalityKind.SENSOR for m in arrays.schema.modalities):
                logger.warning(
                    "site %s: sensor-encoder=gru under DP-SGD: Opacus' DPGRU forms per-sample gradients at every time step, so a "
                    "round takes about %dx as long as with sensor-encoder=cnn (measured on BasicMotions, docs/training.md), with "
                    "no better accuracy there. Recommended: sensor-encoder=cnn", site, GRU_DP_COST,
                )
        plan = state.plan
        if plan.noise_multiplier <= 0:
            raise BudgetExceededError(f"site {site}: noise-multiplier 0 gives no differential privacy; set dp=false to train without it")
        if release and policy is not None and cfg.site_stats_noise < policy.min_noise_multiplier:
            raise BudgetExceededError(
                f"site {site} refuses round {server_round}: site-stats-noise={cfg.site_stats_noise:g} is below this site's floor "
                f"min-noise-multiplier={policy.min_noise_multiplier:g}. Fix: raise site-stats-noise"
            )
        if policy is not None and plan.noise_multiplier < policy.min_noise_multiplier:
            raise BudgetExceededError(
                f"site {site} refuses round {server_round}: noise multiplier {plan.noise_multiplier:.4g} is below this site's floor "
                f"min-noise-multiplier={policy.min_noise_multiplier:g}. Fix: plan for more noise (lower target-epsilon, fewer rounds "
                "or local-epochs, or a larger noise-multiplier)", public=limits,
            )
        spent = ledger.entries() if ledger is not None else []  # one read: every check below and the append follow it
        seen = spent[-1].seq if spent else 0
        if ledger is not None:
            # This run's spends, as the ledger has them (it outlives the Flower node's state).
            state.accountant = SiteAccountant(cfg.accountant, [e.event for e in spent if e.run_id == run_id])
        projected = SiteAccountant(cfg.accountant, [*state.accountant.history, *release]).projected_epsilon(
            cfg.target_delta, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps_per_round
        )
        if projected > cfg.target_epsilon:
            raise BudgetExceededError(
                f"site {site} refuses round {server_round}{with_stats}: it would take epsilon from "
                f"{state.accountant.epsilon(cfg.target_delta):.3f} to "
                f"{projected:.3f} (delta={cfg.target_delta}, {cfg.accountant}), over the budget "
                f"target-epsilon={cfg.target_epsilon}. Fix: raise target-epsilon, or run fewer rounds", public=limits,
            )
        if ledger is not None and policy is not None:
            lifetime = SiteAccountant(cfg.accountant, [e.event for e in spent])
            lifetime_epsilon = SiteAccountant(cfg.accountant, [*lifetime.history, *release]).projected_epsilon(
                policy.delta, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps_per_round
            )
            # Opacus' PRV can come out ~1e-8 lower after a nearly free step (float noise); a
            # stated epsilon never falls, so take the larger of it and the last one stated.
            previous = spent[-1].epsilon if spent else 0.0
            lifetime_epsilon = max(lifetime_epsilon, previous)
            # A ledger that replaced one lost for good carries its spend (basic composition: epsilons and deltas add): `carried` above.
            if carried.epsilon + lifetime_epsilon > policy.epsilon_budget:
                raise BudgetExceededError(
                    f"site {site} refuses round {server_round}{with_stats}: it would take the site's lifetime epsilon from "
                    f"{carried.epsilon + lifetime.epsilon(policy.delta):.3f} to {carried.epsilon + lifetime_epsilon:.3f} "
                    f"(delta={policy.delta + carried.delta:g}, {cfg.accountant}, {lifetime.steps} steps so far"
                    f"{', with the spend of a lost ledger carried over' if carried.epsilon else ''}), over its budget "
                    f"epsilon-budget={policy.epsilon_budget:g}", public=limits,
                )
        if release:
            # Durable in the ledger before the statistics exist, let alone are used.
            stats_epsilon, seen = _release_statistics(cfg, data, stats_columns, state=state, ledger=ledger, policy=policy, run_id=run_id,
                                                      server_round=server_round, follows=seen)
            if ledger is not None:
                lifetime_epsilon = max(lifetime_epsilon, stats_epsilon)
        if state.site_stats is not None:
            arrays = recipe.prepare(state.site_stats.apply(data), tasks_from=server_schema).labelled()
        recipe.check_grad_sample_mode(cfg.grad_sample_mode.value, arrays.schema)
        dp = DPSettings(
            noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
            grad_sample_mode=cfg.grad_sample_mode, accountant=state.accountant,
        )
    steps_before = state.accountant.steps
    round_seed = zlib.crc32(f"{cfg.seed}/{site}/{server_round}".encode())
    augmenter = Augmenter(arrays.schema, run_plan.augment, seed=round_seed) if run_plan.augment else None
    loss = train(
        model, arrays, epochs=cfg.local_epochs, batch_size=batch_size(cfg),
        # lr-schedule over the run's rounds (the server sends the absolute round, also after a resume)
        learning_rate=scheduled_learning_rate(
            run_plan.learning_rate(arrays.schema), server_round, rounds=cfg.rounds, schedule=cfg.lr_schedule, warmup=cfg.lr_warmup_rounds,
        ),
        momentum=run_plan.momentum(arrays.schema), seed=round_seed, dp=dp, augmenter=augmenter,
        balanced_sampler=cfg.balanced_sampler, objective=recipe.objective(arrays.schema, class_weights(cfg, arrays)),
        modality_dropout=recipe.options.modality_dropout, proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        max_physical_batch_size=cfg.max_physical_batch_size, augment_multiplicity=cfg.augment_multiplicity if augmenter is not None else 1,
    )
    report = None
    if dp is not None and state.plan is not None:
        taken = state.accountant.steps - steps_before
        if taken != state.plan.steps_per_round:
            raise PrivacyError(f"site {site}: DP-SGD took {taken} steps, the plan said {state.plan.steps_per_round}; refusing to release the update")
        # The history now is exactly the one the budget check evaluated: reuse its epsilon.
        report = state.accountant.report(cfg.target_delta, epsilon=projected)
        if ledger is not None and policy is not None:
            # Durable before the update can leave: a crash after this loses no spend.
            entry = ledger.append(
                run_id=run_id, round=server_round, noise_multiplier=state.plan.noise_multiplier, sample_rate=state.plan.sample_rate,
                steps=state.plan.steps_per_round, delta=policy.delta, accountant=cfg.accountant.value, epsilon=lifetime_epsilon,
                epsilon_budget=policy.epsilon_budget, data=data_digest(arrays, ledger.data_key), follows=seen,
            )
            report = PrivacyReport(
                epsilon=carried.epsilon + lifetime_epsilon, delta=policy.delta + carried.delta, accountant=cfg.accountant.value, noise_multiplier=entry.noise_multiplier,
                sample_rate=entry.sample_rate, steps=sum(e.steps for e in ledger.events()),
            )
            return SiteUpdate({k: v.detach().clone() for k, v in model.state_dict().items()}, len(arrays), loss, report, entry)
    return SiteUpdate({k: v.detach().clone() for k, v in model.state_dict().items()}, len(arrays), loss, report)


def _release_statistics(
    cfg: RunConfig, data: MultimodalDataset, columns: tuple[str, ...], *, state: SiteState, ledger: PrivacyLedger | None,
    policy: SitePolicy | None, run_id: str, server_round: int, follows: int,
) -> tuple[float, int]:
    """Record the statistics' spend (ledger, durably, then the accountant), then release them into ``state``.

    Returns the site's lifetime epsilon after the release (0 without a ledger) and the ledger's
    newest entry (``follows``, the one the budget checks that count the release read, without a
    ledger): the checks have run already.
    """
    event, epsilon = stats_event(cfg), 0.0
    if ledger is not None and policy is not None:
        spent = ledger.entries()
        lifetime = SiteAccountant(cfg.accountant, [e.event for e in spent])
        epsilon = lifetime.projected_epsilon(policy.delta, noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps)
        epsilon = max(epsilon, spent[-1].epsilon if spent else 0.0)  # a stated epsilon never falls
        follows = ledger.append(
            run_id=run_id, round=server_round, noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps,
            delta=policy.delta, accountant=cfg.accountant.value, epsilon=epsilon, epsilon_budget=policy.epsilon_budget,
            data=data_digest(data, ledger.data_key), mechanism=SITE_STATS_MECHANISM, follows=follows,
        ).seq
    state.accountant.record(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=event.steps)
    state.site_stats = noisy_site_statistics(data, columns, bound=cfg.site_stats_bound, noise_multiplier=cfg.site_stats_noise)
    return epsilon, follows


_DIGESTS: weakref.WeakKeyDictionary[MultimodalDataset, dict[bytes, str]] = weakref.WeakKeyDictionary()  # kept while the data is


def data_digest(ds: MultimodalDataset, key: bytes) -> str:
    """A keyed digest (HMAC-SHA256 with the site's secret ``key``) of its training arrays and labels.

    Recorded with each spend, so an auditor with the ledger can tell which data a spend was
    on; keyed, so the ledger head the server receives cannot be matched against candidate
    datasets (an unkeyed digest let the server test which of two neighbouring datasets a
    site used with about 10^6 guesses).
    """
    known = _DIGESTS.get(ds, {}).get(key)
    if known is not None:  # the same arrays (a dataset is frozen) and key: a site's data does not change between rounds
        return known
    digest = hmac.new(key, digestmod=hashlib.sha256)
    for name in ds.schema.names:
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(ds.features[name]).tobytes())
    digest.update(np.ascontiguousarray(ds.label).tobytes())
    known = digest.hexdigest()[:16]
    _DIGESTS.setdefault(ds, {})[key] = known
    return known
