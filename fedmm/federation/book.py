"""The server's book of its sites, whichever aggregation runs (testable without Flower's server).

- :class:`SitePrivacy`: one site's privacy report as it sent it after a round;
- :class:`FederationBook`: privacy reports (aggregated as a maximum), refusals, rejected
  updates (per reason and per site), min-sites, the global model's finiteness, and
  client-level DP (sampling, noise and its accountant). Shared by
  :class:`fedmm.federation.strategy.FedMMAvg` and :class:`fedmm.federation.secagg.SecureFedMM`.

The checks of one reply's update and weight are in :mod:`fedmm.federation.checks`.

The reporting rule: a site spends its budget before its reply leaves it, so every privacy
report the server receives is kept (:meth:`FederationBook.keep_reports`), first thing, in
any reply: also one whose update is then rejected or discarded, and one of a round that
stops below min-sites or fails. What was spent always reaches ``privacy.json``.
"""
from __future__ import annotations

import dataclasses
import math
import random
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from logging import INFO, WARNING

import numpy as np

from flwr.app import ArrayRecord, RecordDict
from flwr.common.logger import log

from fedmm import protocol
from fedmm.errors import FederationError, PrivacyError, SitesExhausted
from fedmm.federation.identity import SiteAccount
from fedmm.privacy.accounting import PrivacyEvent, PrivacyReport
from fedmm.privacy.client_dp import ClientAccountant, ClientDPPlan, gaussian_noise
from fedmm.secure.identity import EnrolledKeys

__all__ = ["SitePrivacy", "Rejection", "FederationBook"]


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


@dataclass(frozen=True, kw_only=True)
class SitePrivacy(PrivacyReport):
    """One site's cumulative privacy loss as it reported it after a round."""

    site: str
    epsilon_budget: float | None = None  # the site's own lifetime budget (from its ledger)
    ledger_seq: int | None = None  # the site's ledger head after its last update: a witness for audits
    ledger_hash: str | None = None
    refused: str | None = None  # why the site stopped taking part, if it did
    epsilon_site: float | None = None  # what the site stated (``epsilon`` is the larger of this and the server's figure)
    epsilon_server: float | None = None  # the server's own accountant over this run's rounds of the site (fedmm.federation.identity)

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
        return cls.from_mapping(rec, node=node)

    @classmethod
    def from_mapping(cls, rec: Mapping[str, object], *, node: int) -> SitePrivacy:
        """Read and check a privacy report given as a flat mapping (a ConfigRecord or legacy metrics)."""

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


@dataclass(frozen=True)
class Rejection:
    """One update the server left out of the aggregate: when, whose, and why."""

    round: int
    node: int
    site: str  # the name the reply gives (its privacy report), else ``node-<id>``
    reason: str  # check_update's or check_weight's kind, or ``layout``, ``metrics``
    detail: str


class FederationBook:
    """What the server keeps about its sites across rounds, whichever aggregation runs.

    Shared by :class:`FedMMAvg` (plain) and :class:`fedmm.federation.secagg.SecureFedMM`
    (SecAgg+): privacy reports, refusals, rejected updates, min-sites, and client-level DP
    (sampling, noise and its accountant).
    """

    def __init__(self, *, dp: bool, min_sites: int = 1, client_dp: ClientDPPlan | None = None, client_fraction: float = 1.0, seed: int = 0) -> None:
        self.dp = dp
        self.min_sites = min_sites
        self.client_dp, self.client_fraction, self.seed = client_dp, client_fraction, seed  # client_fraction: sample_nodes
        self.client_accountant = (
            ClientAccountant(noise_multiplier=client_dp.noise_multiplier, sample_rate=client_dp.sample_rate) if client_dp else None
        )
        self.site_privacy: dict[str, SitePrivacy] = {}
        self.last_train_metrics: dict[str, float] = {}
        self.sites_last_round: int = 0
        self.refused_nodes: set[int] = set()  # sites that refused a round (budget or policy): not asked again
        self.latest_arrays: ArrayRecord | None = None
        self.rejected: Counter[str] = Counter()  # updates not aggregated, per reason, over the run
        self.rejections: list[Rejection] = []  # each of them: round, node, site and reason
        self.least_updates = 1  # what the aggregation rule needs, on top of min-sites
        self.round_report: dict[str, int] = {}  # this round's counts: rejected, dropped
        self.round_offset = 0  # rounds done before a resume: Flower counts from 1 again
        self.accounts: SiteAccount | None = None  # the server's own account of each site (expect_identities)
        self.enrolled: EnrolledKeys | None = None  # a deployment's enrolled site keys: every report proves its name
        self.enrolled_name: Callable[[int], str | None] | None = None  # a deployment: node -> the site its registered key is enrolled as
        self.run_id = ""
        self.unaggregated_spends: Counter[str] = Counter()  # ledger entries of rounds lost to a server restart

    # ------------------------------------------------------------ checkpoints
    def to_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the server's knowledge (JSON-ready)."""
        return {
            "site_privacy": [dataclasses.asdict(p) for p in self.site_privacy.values()],
            "rejected": dict(self.rejected), "sites_last_round": self.sites_last_round,
            "rejections": [dataclasses.asdict(r) for r in self.rejections],
            "last_train_metrics": self.last_train_metrics, "unaggregated_spends": dict(self.unaggregated_spends),
            "client_rounds": self.client_accountant.rounds if self.client_accountant is not None else 0,
            "client_history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self.client_accountant.history] if self.client_accountant is not None else [],
            "accounts": self.accounts.state() if self.accounts is not None else {},
        }

    def restore(self, state: Mapping[str, Any], *, rounds_done: int) -> None:
        """Continue from a checkpoint taken after round ``rounds_done``.

        Refusals are not carried over by node id (a restarted SuperLink may number nodes
        anew); a site out of budget simply refuses again. The client-level accountant gets
        every round the checkpoint had accounted, so nothing is forgotten.
        """
        self.site_privacy = {p["site"]: SitePrivacy(**p) for p in state.get("site_privacy", [])}
        self.rejected = Counter(state.get("rejected", {}))
        self.rejections = [Rejection(**r) for r in state.get("rejections", [])]
        self.sites_last_round = int(state.get("sites_last_round", 0))
        self.last_train_metrics = dict(state.get("last_train_metrics", {}))
        self.unaggregated_spends = Counter(state.get("unaggregated_spends", {}))
        if self.accounts is not None:  # the server's own accountant of each site goes on where it stopped
            self.accounts.restore(state.get("accounts", {}))
        if self.client_accountant is not None:
            if "client_history" in state:  # each round at the noise and sample rate it ran with, whatever this run's config says
                self.client_accountant.restore(PrivacyEvent(float(s), float(q), int(n)) for s, q, n in state["client_history"])
            else:  # a checkpoint of an older fedmm: its rounds, at this run's mechanism
                for _ in range(int(state.get("client_rounds", 0))):
                    self.client_accountant.record_round()
        self.round_offset = rounds_done

    def record_privacy(self, server_round: int, report: SitePrivacy) -> None:
        """Keep a site's report, and reconcile its ledger with what the server last saw of it.

        A ledger that moved on by more than one entry since the site's last aggregated
        update holds spends of rounds the server never aggregated (lost to a restart of the
        server, or refused after training): they stay in the site's epsilon, and are counted.
        """
        known = self.site_privacy.get(report.site)
        if known is not None and known.ledger_seq is not None and report.ledger_seq is not None and report.ledger_seq - known.ledger_seq > 1:
            lost = report.ledger_seq - known.ledger_seq - 1
            self.unaggregated_spends[report.site] += lost
            log(WARNING, "[fedmm] round %d: site %s's ledger holds %d spend(s) of round(s) the server never aggregated "
                "(lost to a server restart); they count in its epsilon %.3f", server_round, report.site, lost, report.epsilon)
        if known is not None and report.epsilon < known.epsilon:
            # A site's lifetime epsilon never falls; a lower report (a stale copy, two nodes under one name) loses.
            log(WARNING, "[fedmm] round %d: site %s reported epsilon %.3f, below the %.3f on record; the larger stays",
                server_round, report.site, report.epsilon, known.epsilon)
            return
        self.site_privacy[report.site] = report

    def keep_reports(
        self, server_round: int, reports: Iterable[tuple[int, Mapping[str, object]]], *, on_refused: Callable[[int, str], None] | None = None,
    ) -> None:
        """Keep every privacy report received, ``(node, report)``, whatever becomes of the updates.

        Called before any check can stop the round: the sites spent this budget already. A
        malformed report fails the round (its site's privacy cannot be stated), after every
        well-formed one is kept. Nothing is kept without sample-level DP.

        Raises
        ------
        FederationError
            For the first report with a value missing, of the wrong type or not finite.
        """
        if not self.dp:
            return
        problems: list[FederationError] = []
        lies: list[FederationError] = []
        for node, record in reports:
            try:
                report = SitePrivacy.from_mapping(record, node=node)
            except (FederationError, PrivacyError, ValueError, ArithmeticError) as problem:
                problems.append(problem if isinstance(problem, FederationError) else FederationError(f"node {node}: privacy report refused ({problem})"))
                continue
            try:
                report = self.vouch(server_round, node, report, record.get(protocol.PROOF))
            except (FederationError, PrivacyError, ValueError, ArithmeticError) as error:
                lie = error if isinstance(error, FederationError) else FederationError(f"node {node}: privacy report refused ({error})")
                # A borrowed name, a ledger or epsilon going back, steps the plan does not give: not recorded under
                # that name; the update is left out where the path allows it (plain), else the run stops (SecAgg+),
                # after every other report of the round is kept. The node is not asked again: its next report could
                # not be vouched for either, and each round it trained would be a spend on no one's record.
                claimed = f" (its report: epsilon {report.epsilon:.6g} at delta {report.delta:g}, ledger entry {report.ledger_seq}, {report.steps} steps)"
                lie = FederationError(f"{lie}{claimed}")
                self.refused_nodes.add(node)
                if on_refused is None:
                    lies.append(lie)
                else:
                    on_refused(node, str(lie))
                continue
            self.record_privacy(server_round, report)
        if problems or lies:
            raise (problems + lies)[0]

    def expect_identities(self, *, accountant: str, delta: float, local_epochs: int, run_id: str, keys: EnrolledKeys | None) -> None:
        """Check every report from now on: its proof against the enrolled ``keys`` (a deployment) and its numbers
        against the server's own account of the site (:class:`fedmm.federation.identity.SiteAccount`)."""
        self.accounts = SiteAccount(accountant=accountant, delta=delta, local_epochs=local_epochs)
        self.enrolled, self.run_id = keys, run_id

    def enrolled_config(self, node: int) -> dict[str, str]:
        """The train config entry telling ``node`` which site its registered key is enrolled as (a deployment), so a
        site given another's key refuses before it trains and spends; empty where the server does not know."""
        name = self.enrolled_name(node) if self.enrolled_name is not None else None
        return {protocol.ENROLLED: name} if name else {}

    def vouch(self, server_round: int, node: int, report: SitePrivacy, proof: object) -> SitePrivacy:
        """The report as the server records it (epsilon: the larger of the site's and its own), or FederationError."""
        if self.accounts is None:
            return report
        if self.enrolled is not None:
            self.enrolled.verify(proof, run_id=self.run_id, server_round=server_round, node=node, site=report.site)
        self.accounts.observe(
            node=node, site=report.site, seq=report.ledger_seq, epsilon=report.epsilon, delta=report.delta, noise_multiplier=report.noise_multiplier,
            sample_rate=report.sample_rate, steps=report.steps, server_round=server_round,
        )
        ours = self.accounts.server_epsilon(report.site, report.delta)
        return dataclasses.replace(report, epsilon=max(report.epsilon, ours or 0.0), epsilon_site=report.epsilon, epsilon_server=ours)

    def note_refusal(self, server_round: int, node: int, site: str, reason: str, *, spent: object = None, budget: object = None) -> None:
        """A site declined the round (budget or policy): keep its last report, do not ask it again.

        A site that refuses the first round it is asked in has no report yet: it is put on record with what
        its refusal states (``spent``: its ledger's lifetime epsilon; ``budget``), so ``privacy.json`` names
        every site the run asked. Its figure is the site's own (no steps of this run to check it against).
        """
        self.refused_nodes.add(node)
        known = self.site_privacy.get(site)
        if known is not None:
            self.site_privacy[site] = dataclasses.replace(known, refused=reason)
        elif self.dp and _finite(spent) and not (self.accounts is not None and self.accounts.site_of(node) not in (None, site)):
            self.site_privacy[site] = SitePrivacy(
                site=site, epsilon=float(spent), delta=self.accounts.delta if self.accounts is not None else 0.0,  # type: ignore[arg-type]
                accountant="as its ledger states", noise_multiplier=0.0, sample_rate=0.0, steps=0,
                epsilon_budget=float(budget) if _finite(budget) else None, refused=reason, epsilon_site=float(spent),  # type: ignore[arg-type]
            )
        log(INFO, "[fedmm] round %d: %s", server_round, reason)

    def reject(self, server_round: int, node: int, kind: str, detail: str, *, site: str | None = None) -> None:
        """Leave one update out of the aggregate, and count it per reason and per site."""
        label = site or f"node-{node}"
        self.rejected[kind] += 1
        self.rejections.append(Rejection(round=server_round, node=node, site=label, reason=kind, detail=detail))
        self.round_report["rejected"] = self.round_report.get("rejected", 0) + 1
        log(WARNING, "[fedmm] round %d: update of %s (node %d) rejected (%s): %s", server_round, label, node, kind, detail)

    @property
    def rejected_by_site(self) -> dict[str, dict[str, int]]:
        """Rejected updates over the run, per site and reason (for ``summary.json``)."""
        out: dict[str, Counter[str]] = {}
        for r in self.rejections:
            out.setdefault(r.site, Counter())[r.reason] += 1
        return {site: dict(sorted(c.items())) for site, c in sorted(out.items())}

    def rejected_in(self, server_round: int) -> dict[str, list[str]]:
        """This round's rejected updates: the reasons, per site (for ``metrics.jsonl``)."""
        out: dict[str, list[str]] = {}
        for r in self.rejections:
            if r.round == server_round:
                out.setdefault(r.site, []).append(r.reason)
        return out

    def require_sites(self, server_round: int, accepted: int) -> None:
        """Stop the run when fewer updates are left than ``min-sites`` (or the aggregation rule) needs."""
        if accepted < max(self.min_sites, self.least_updates):
            needs = f"min-sites={self.min_sites}" if self.min_sites >= self.least_updates else f"the {self.least_updates} the aggregation rule needs"
            raise SitesExhausted(
                f"round {server_round}: {accepted} update(s) could be aggregated, fewer than {needs}; "
                f"{len(self.refused_nodes)} site(s) have refused (budget or policy), "
                f"{sum(self.rejected.values())} update(s) were rejected so far ({dict(self.rejected)}; per site "
                f"{self.rejected_by_site}). The run stops here"
            )

    @staticmethod
    def check_global(server_round: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Stop the run before a global model that is not finite is used, checkpointed or saved."""
        bad = {k: int(np.sum(~np.isfinite(v))) for k, v in arrays.items() if v.dtype.kind in "fc" and not np.all(np.isfinite(v))}
        if bad:
            raise FederationError(
                f"round {server_round}: the aggregated global model holds NaN or infinite values ({bad}); it is not applied, "
                "checkpointed or saved, and the run stops. Every update passed its checks, so look at the values the sites "
                "sent (the log above) and lower learning-rate or max-update-norm"
            )

    def sample_nodes(self, server_round: int, nodes: Iterable[int], *, at_least: int = 1) -> list[int]:
        """The nodes asked this round: every eligible one, a Poisson sample under client-level DP, or without it
        ``ceil(client-fraction x eligible)`` drawn with the seed and round (at least min-sites and what the rule needs).

        Raises :class:`SitesExhausted` before the round when the client-level budget would be
        exceeded, and :class:`FederationError` when the sample is too small to aggregate.
        """
        eligible = sorted(n for n in nodes if n not in self.refused_nodes)
        if self.client_dp is None:
            wanted = max(math.ceil(self.client_fraction * len(eligible) - 1e-9), self.min_sites, self.least_updates, at_least)
            self.round_report["eligible"] = len(eligible)  # a site not asked trains and spends nothing this round
            return eligible if wanted >= len(eligible) else sorted(random.Random(f"{self.seed}:{server_round}").sample(eligible, wanted))
        assert self.client_accountant is not None
        if self.client_dp.target_epsilon is not None:
            projected = self.client_accountant.projected_epsilon(self.client_dp.delta)
            if projected > self.client_dp.target_epsilon:
                raise SitesExhausted(
                    f"round {server_round}: client-level epsilon would go from {self.client_accountant.epsilon(self.client_dp.delta):.3f} "
                    f"to {projected:.3f} (delta={self.client_dp.delta:g}, rdp), over client-target-epsilon={self.client_dp.target_epsilon:g}. "
                    "The run stops here"
                )
        self.round_report["eligible"] = len(eligible)
        if self.client_dp.sample_rate >= 1.0:
            return eligible
        draw = secrets.SystemRandom()
        chosen = [n for n in eligible if draw.random() < self.client_dp.sample_rate]
        if len(chosen) < at_least:
            raise FederationError(
                f"round {server_round}: Poisson sampling with client-fraction={self.client_dp.sample_rate:g} chose {len(chosen)} of "
                f"{len(eligible)} sites, fewer than the {at_least} the round needs. Fix: raise client-fraction or add sites"
            )
        return chosen

    def privatise(self, server_round: int, summed: dict[str, np.ndarray], *, updates: int, noise_parties: int | None = None) -> dict[str, np.ndarray]:
        """Client-level DP on the sum of ``updates`` clipped updates: noise, account, average.

        ``noise_parties``: with distributed noise, the count each site calibrated its share
        for; fewer updates than that would be under-noised, and the run stops (it cannot
        happen with SecAgg+, which does not unmask below its threshold; this is a second lock).
        """
        plan, accountant = self.client_dp, self.client_accountant
        assert plan is not None and accountant is not None
        if plan.distributed:
            if noise_parties is None or updates < noise_parties:
                raise PrivacyError(
                    f"round {server_round}: {updates} update(s) carry distributed noise calibrated for at least {noise_parties}; "
                    "their sum is under-noised, so the round is not used and the run stops"
                )
        else:
            noise = gaussian_noise({k: v.shape for k, v in summed.items()}, plan.sum_noise_std)
            summed = {k: v + noise[k] for k, v in summed.items()}
        accountant.record_round()
        expected = plan.sample_rate * self.round_report.get("eligible", updates)
        return {k: v / expected for k, v in summed.items()}

    @property
    def max_epsilon(self) -> float | None:
        """The federation's sample-level privacy loss: the largest epsilon of any site (None without DP)."""
        return max((p.epsilon for p in self.site_privacy.values()), default=None) if self.dp else None

    @property
    def client_epsilon(self) -> float | None:
        """The federation's client-level epsilon at ``client-delta`` (None without client-level DP)."""
        if self.client_accountant is None or self.client_dp is None:
            return None
        return self.client_accountant.epsilon(self.client_dp.delta)
