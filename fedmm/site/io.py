"""The plain data a site's round takes and gives (light: numpy only, no PyTorch).

Shared by the ClientApp, which imports nothing heavy for SecAgg+'s protocol stages, and
:func:`fedmm.site.runner.run_round`. :class:`SiteRoundFailed` is what the server is told
when a site's round fails on something of its own: the error's kind, never its text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmm.errors import FederationError
from fedmm.secure.params import SecAggParams

__all__ = ["SecAggParams", "RoundRequest", "RoundResponse", "SiteRoundFailed"]  # SecAggParams: from fedmm.secure.params


class SiteRoundFailed(FederationError):
    """A site's round failed on its own data, model input or training: the one error the server is told of.

    Flower sends an exception raised in a ClientApp to the server as it is (``type: text``),
    and an error about a site's data (its class list, its series length, its counts, a row)
    would tell the server facts about the records outside DP, and whether a round fails
    could hang on one record. So the text here is fixed: the site (its configured name, when
    known), the round, the error's kind and where the details are. The details (``detail``,
    never sent) go to the site's own log.

    >>> str(SiteRoundFailed("george", 3, "DataError", detail="manifest row 7: ..."))
    "site george: round 3 failed at the site (DataError); the reason is in the site's own log, not sent to the server"
    """

    def __init__(self, site: str | None, server_round: object, kind: str, *, detail: str = "") -> None:
        who = f"site {site}" if site else "a site"
        super().__init__(f"{who}: round {server_round} failed at the site ({kind}); the reason is in the site's own log, not sent to the server")
        self.site, self.server_round, self.kind = site, server_round, kind
        self.detail = detail  # what/where/value/fix, for the site's own log only

    def __reduce__(self) -> tuple[type[SiteRoundFailed], tuple[str | None, object, str]]:
        return type(self), (self.site, self.server_round, self.kind)  # pickled (a worker's reply) without the detail


@dataclass
class RoundRequest:
    """Everything a site needs for one round (all plain, picklable data)."""

    run_config: dict[str, Any]
    node_config: dict[str, Any]
    config: dict[str, Any]  # the server's round instructions (round, schema, run id, ...)
    global_weights: dict[str, np.ndarray]
    saved_state: str | None = None  # SiteState JSON from the Flower node's state
    secagg: SecAggParams | None = None  # set inside a SecAgg+ round
    node_id: int = 0  # the Flower node this site runs as (signed into a deployed site's proof)


@dataclass
class RoundResponse:
    """What the site answers: its update (or refusal), its metrics and privacy report."""

    site: str
    refused: str | None = None
    spent: float = 0.0
    budget: float = 0.0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # weights, or the update under SecAgg+/client DP
    weight: int = 0  # FedAvg weight of ``arrays`` (SecAgg+)
    metrics: dict[str, Any] = field(default_factory=dict)  # num-examples, train-loss, epsilon
    privacy: dict[str, Any] = field(default_factory=dict)  # the privacy ConfigRecord (empty without DP)
    layout: str = ""
    clipped_values: int = 0
    state: str | None = None  # the new SiteState JSON
    proof: str = ""  # a deployed site's signed claim to its name (fedmm.secure.identity); empty in simulation
