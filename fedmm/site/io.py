"""The plain data a site's round takes and gives (light: numpy only, no PyTorch).

Shared by the ClientApp, which imports nothing heavy for SecAgg+'s protocol stages, and
:func:`fedmm.site.runner.run_round`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmm.secure.params import SecAggParams

__all__ = ["SecAggParams", "RoundRequest", "RoundResponse"]  # SecAggParams: from fedmm.secure.params


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
