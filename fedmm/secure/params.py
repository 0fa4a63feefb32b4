"""SecAgg+'s quantisation settings as a site sees them (light: no PyTorch, no Flower)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SecAggParams"]


@dataclass(frozen=True)
class SecAggParams:
    """The SecAgg+ quantisation settings of a round, as the protocol's setup stage gave them."""

    clip_range: float
    max_weight: float
    target_range: int
    threshold: int  # the fewest updates a completed round can aggregate

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> SecAggParams:
        """Read them from the node state Flower's ``secaggplus_mod`` keeps (``secaggplus_state``)."""
        if state is None:
            raise ValueError("no SecAgg+ state at this site: the setup stage did not run before training")
        return cls(
            clip_range=float(state["clipping_range"]), max_weight=float(state["max_weight"]),
            target_range=int(state["target_range"]), threshold=int(state["threshold"]),
        )
