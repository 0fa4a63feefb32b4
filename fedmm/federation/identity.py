"""The server's own account of each site: who it is, and what its reports imply it spent.

The server does not take a site's privacy report on trust. For every report it:

- holds the site to one node: a second node claiming a name already held in this run is
  refused (in a simulation the names come from the partition; in a deployment each node's
  name is the one enrolled with its registered key, see :mod:`fedmm.runtime.deploy`);
- refuses a ledger sequence number that goes backwards and an epsilon that falls;
- recomputes the site's epsilon for this run with its own accountant, from the mechanism the
  site reports (noise multiplier and Poisson sample rate) and the steps the plan gives a
  round (``local-epochs`` x Opacus' ``int(1 / sample_rate)``), and checks that the site's
  own step count moved by exactly that much.

What is recorded is the larger of the site's lifetime epsilon and the server's figure for
this run (a site's lifetime includes runs the server never saw); both go to ``privacy.json``.

>>> check = SiteAccount(accountant="rdp", delta=1e-5, local_epochs=1)
>>> check.observe(node=7, site="george", seq=1, epsilon=0.5, noise_multiplier=1.0, sample_rate=0.25, steps=4)
>>> round(check.server_epsilon("george"), 3) > 0
True
>>> check.observe(node=8, site="george", seq=2, epsilon=0.9, noise_multiplier=1.0, sample_rate=0.25, steps=8)
Traceback (most recent call last):
...
fedmm.errors.FederationError: node 8 claims site 'george', which node 7 holds in this run; refused (a borrowed or duplicated name)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedmm.config import AccountantKind
from fedmm.errors import FederationError
from fedmm.privacy.accounting import PrivacyEvent, SiteAccountant

__all__ = ["SiteAccount"]


@dataclass
class _Seen:
    node: int | None  # None: restored from a checkpoint, not yet claimed by a node of this server's life
    seq: int | None
    epsilon: float
    steps: int
    accountant: SiteAccountant
    round: int | None = None  # the round of the last report accounted


@dataclass
class SiteAccount:
    """Per site: its node, its last ledger head and epsilon, and the server's own accountant of this run."""

    accountant: str
    delta: float
    local_epochs: int
    _sites: dict[str, _Seen] = field(default_factory=dict)
    _nodes: dict[int, str] = field(default_factory=dict)

    def site_of(self, node: int) -> str | None:
        """The site ``node`` has reported as in this run (None before its first report)."""
        return self._nodes.get(node)

    def observe(
        self, *, node: int, site: str, seq: int | None, epsilon: float, noise_multiplier: float, sample_rate: float, steps: int,
        delta: float | None = None, server_round: int | None = None,
    ) -> None:
        """Check one report against what the server knows and account it.

        Raises
        ------
        FederationError
            For a borrowed name, a node that changes its name, a ledger or epsilon that goes
            back, or a step count that does not match the plan.
        """
        if delta is not None and not 0 < delta <= self.delta * (1 + 1e-9):
            raise FederationError(
                f"site {site!r} states its epsilon at delta {delta:g}, weaker than the run's target-delta {self.delta:g}; "
                "refused (epsilons at different deltas cannot be compared)"
            )
        held = self._nodes.get(node)
        if held is not None and held != site:
            raise FederationError(f"node {node} reported as site {site!r} after reporting as {held!r}; refused (a site's name does not change)")
        seen = self._sites.get(site)
        if seen is not None and seen.node is not None and seen.node != node:
            raise FederationError(f"node {node} claims site {site!r}, which node {seen.node} holds in this run; refused (a borrowed or duplicated name)")
        if seen is not None and (seen.node, seen.seq, seen.epsilon, seen.steps, seen.round) == (node, seq, epsilon, steps, server_round):
            return  # the same report again in the same round (SecAgg+ reads a reply's report as its vector arrives and again when aggregating)
        if seen is not None and (seen.seq, seen.epsilon, seen.steps) == (seq, epsilon, steps):
            raise FederationError(
                f"site {site!r} sent the privacy report of round {seen.round} again in round {server_round} (ledger entry {seq}, epsilon {epsilon:.6g}, "
                f"{steps} steps): a round that trained moves all three, so the report is refused"
            )
        if seen is not None:
            if seq is not None and seen.seq is not None and seq <= seen.seq:
                raise FederationError(f"site {site!r} reported ledger entry {seq} after entry {seen.seq}; a ledger only grows, so the report is refused")
            if epsilon < seen.epsilon:
                raise FederationError(f"site {site!r} reported epsilon {epsilon:.6g} after {seen.epsilon:.6g}; a spent epsilon never falls, so the report is refused")
        if not (0 < sample_rate <= 1 and 1 / sample_rate < 1e9 and 0 < noise_multiplier < 1e6):
            raise FederationError(f"site {site!r} reported a mechanism outside DP-SGD's range (noise multiplier {noise_multiplier}, sample rate {sample_rate}); refused")
        round_steps = self.local_epochs * int(1 / sample_rate)  # what the plan gives a round (Opacus' Poisson loader)
        # One ledger entry since the last report: exactly one round of this plan. More (a lost reply, or the site's
        # spends in another federation in between): at least this round; the server accounts only what it knows.
        entries = (seq - seen.seq) if seen is not None and seq is not None and seen.seq is not None else 1
        moved = steps - seen.steps if seen is not None else round_steps
        if (entries == 1 and moved != round_steps) or moved < round_steps:
            raise FederationError(
                f"site {site!r}: its step count moved from {seen.steps if seen else 0} to {steps} over {entries} ledger entr{'y' if entries == 1 else 'ies'}, "
                f"the plan gives {round_steps} a round (local-epochs={self.local_epochs}, sample rate {sample_rate:.6g}); the report is refused"
            )
        account = seen.accountant if seen is not None else SiteAccountant(AccountantKind(self.accountant))
        account.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=round_steps)
        self._sites[site] = _Seen(node, seq, epsilon, steps, account, server_round)
        self._nodes[node] = site

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: per site, the last report's ledger entry, epsilon and steps and the server's
        own accountant (not the node: a restarted SuperLink numbers its nodes anew)."""
        return {
            site: {"seq": seen.seq, "epsilon": seen.epsilon, "steps": seen.steps, "round": seen.round,
                   "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in seen.accountant.history]}
            for site, seen in self._sites.items()
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue the account of :meth:`state`: each site's next report is checked against its last one, and the
        server's epsilon for it counts the rounds before the checkpoint too. The first node to report a name claims it."""
        for site, saved in state.items():
            history = [PrivacyEvent(float(sigma), float(q), int(n)) for sigma, q, n in saved["history"]]
            self._sites[str(site)] = _Seen(
                None, None if saved["seq"] is None else int(saved["seq"]), float(saved["epsilon"]), int(saved["steps"]),
                SiteAccountant(AccountantKind(self.accountant), history), None if saved.get("round") is None else int(saved["round"]),
            )

    def server_epsilon(self, site: str, delta: float | None = None) -> float | None:
        """The server's own epsilon for ``site`` over the rounds of this run it saw, at ``delta`` (the run's by default)."""
        seen = self._sites.get(site)
        return seen.accountant.epsilon(delta or self.delta) if seen is not None and seen.accountant.history else None

    def owner(self, site: str) -> int | None:
        """The node that holds ``site``'s name in this run."""
        seen = self._sites.get(site)
        return seen.node if seen is not None else None
