"""What a site allows, set by the site itself: its lifetime budget and its floors.

In a deployment the policy comes from the SuperNode's own ``--node-config`` (the site's
configuration, which the server never sees or changes):

- ``state-dir``: the site's directory for its ledger (required with DP);
- ``epsilon-budget``: the site's epsilon over all runs, ever (required with DP);
- ``delta``: the delta that budget is stated at (default 1e-5);
- ``min-noise-multiplier``: the least noise the site accepts (default 0.5);
- ``require-dp``: refuse runs with ``dp=false`` (default true).

In a simulation (one person plays server and every site) the same policy comes from the
run config: ``site-budgets`` (e.g. ``"george:2,*:8"``; default ``target-epsilon`` for
all), ``site-min-noise-multiplier``, and ``site-state-dir`` (default: the run's own
folder, ``runs/<run-id>/sites/<site>``, so runs start from a fresh ledger unless it
names a lasting directory, where spends then compose across runs). That simulation policy is
never taken in a deployed site's process (``fedmm site``'s executor, or Flower's
``flwr-clientapp``): a SuperNode started by hand with only ``partition-id`` in its node config,
as Flower's tutorials do, is refused rather than given budgets and ``dp`` by the server.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.errors import ConfigError

__all__ = ["SitePolicy", "site_policy", "parse_site_budgets", "mark_deployed_process", "DEFAULT_MIN_BATCH", "DEFAULT_MIN_NOISE"]

DEFAULT_MIN_NOISE = 0.5
# A deployed site's smallest batch-size: the sample rate 1 / ceil(n / batch) in its privacy report tells n to
# within a batch, so a server asking for batch-size=1 would learn the exact record count.
DEFAULT_MIN_BATCH = 16
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_NODE_KEYS = frozenset({
    protocol.NODE_SITE, protocol.NODE_DATA, protocol.NODE_STATE_DIR, protocol.NODE_EPSILON_BUDGET, protocol.NODE_DELTA,
    protocol.NODE_MIN_NOISE, protocol.NODE_MIN_BATCH, protocol.NODE_REQUIRE_DP, protocol.NODE_KEY, protocol.NODE_PARTITION_ID, "num-partitions",
    protocol.NODE_LENIENT,
})  # every key a site's node config may hold (num-partitions: Flower's, beside partition-id)
_DEPLOYED_PROCESS = False  # set by a deployed site's own process (fedmm.runtime.executor.main)


def mark_deployed_process() -> None:
    """This process runs a deployed site's ClientApps: the simulation policy is never taken in it."""
    global _DEPLOYED_PROCESS
    _DEPLOYED_PROCESS = True


def _deployed_process() -> bool:
    return _DEPLOYED_PROCESS or Path(sys.argv[0]).name == "flwr-clientapp"  # Flower's own per-message ClientApp process


@dataclass(frozen=True)
class SitePolicy:
    """A site's own limits; the server cannot raise them."""

    state_dir: Path
    epsilon_budget: float
    delta: float = 1e-5
    min_noise_multiplier: float = DEFAULT_MIN_NOISE
    require_dp: bool = True
    min_batch_size: int = 1  # a simulation's sites: no floor (one person plays every part)
    fresh_state: bool = False  # a simulation's own per-run folder: its first ledger is made on first use

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon_budget) and self.epsilon_budget > 0):
            raise ConfigError("epsilon-budget", "must be a finite number > 0", value=self.epsilon_budget, fix="e.g. epsilon-budget=8")
        if not 0 < self.delta < 1:
            raise ConfigError("delta", "must be in (0, 1)", value=self.delta, fix="e.g. delta=1e-5")
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise ConfigError("min-noise-multiplier", "must be a finite number >= 0", value=self.min_noise_multiplier, fix="e.g. min-noise-multiplier=0.5")
        if isinstance(self.min_batch_size, bool) or not isinstance(self.min_batch_size, int) or self.min_batch_size < 1:
            raise ConfigError("min-batch-size", "must be an integer >= 1", value=self.min_batch_size, fix=f"e.g. min-batch-size={DEFAULT_MIN_BATCH}")

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"


def parse_site_budgets(spec: str, default: float) -> dict[str, float]:
    """``"george:2,*:8"`` -> ``{"george": 2.0, "*": 8.0}``; ``"*"`` defaults to ``default``.

    >>> parse_site_budgets("george:2", 8.0)
    {'*': 8.0, 'george': 2.0}
    """
    budgets = {"*": default}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, value = item.rpartition(":")
        try:
            budgets[name.strip() if sep else "*"] = float(value)
        except ValueError:
            raise ConfigError("site-budgets", f"entry {item!r} is not 'site:epsilon'", value=spec, fix="e.g. site-budgets='george:2,*:8'") from None
    for name, budget in budgets.items():
        if not (math.isfinite(budget) and budget > 0):
            raise ConfigError("site-budgets", f"budget of {name!r} must be a finite number > 0", value=spec, fix="e.g. site-budgets='george:2,*:8'")
    return budgets


def site_policy(node_config: Mapping[str, object], cfg: RunConfig, *, site: str, run_id: str) -> SitePolicy:
    """This site's policy: from its node config in a deployment, from the run config in a simulation."""
    if not _PLAIN_NAME.fullmatch(run_id) or run_id in (".", ".."):
        raise ConfigError("run id", "must be a plain name (letters, digits, '.', '_', '-'): it names a folder", value=run_id, fix="use fedmm's ServerApp and a plain run-name")
    deployed = any(k in node_config for k in (protocol.NODE_STATE_DIR, protocol.NODE_DATA, protocol.NODE_KEY, protocol.NODE_EPSILON_BUDGET))
    example = "--node-config \"state-dir='/srv/fedmm' epsilon-budget=8 data='manifest:/srv/site/manifest.csv'\""
    if deployed:  # a misspelt policy key would be ignored: the site would train on a default it did not choose
        unknown = sorted(set(map(str, node_config)) - _NODE_KEYS)
        if unknown:
            close = {k: difflib.get_close_matches(k, sorted(_NODE_KEYS), n=1) for k in unknown}
            raise ConfigError(
                "node-config", "has unknown key(s) " + ", ".join(f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items()),
                value=unknown, fix=f"the site's node config takes {', '.join(sorted(_NODE_KEYS - {protocol.NODE_PARTITION_ID, 'num-partitions'}))}",
            )
    if protocol.NODE_PARTITION_ID in node_config and not deployed and _deployed_process():
        raise ConfigError(
            "node-config", "names a simulation's partition (partition-id) but no site policy, in a deployed site's process: "
            "there the site, not the server, sets its budget, its ledger folder and whether DP is required",
            value=dict(node_config), fix=f"start the SuperNode with {example}",
        )
    if protocol.NODE_PARTITION_ID in node_config and not deployed:
        budgets = parse_site_budgets(cfg.site_budgets, cfg.target_epsilon)
        root = Path(cfg.site_state_dir).expanduser() if cfg.site_state_dir else Path(cfg.runs_dir).expanduser() / run_id / "sites"
        return SitePolicy(
            state_dir=root.resolve() / site, epsilon_budget=budgets.get(site, budgets["*"]), delta=cfg.target_delta,
            min_noise_multiplier=cfg.site_min_noise_multiplier, require_dp=False,  # the simulation's owner chose dp
            fresh_state=not cfg.site_state_dir,  # a lasting folder's ledgers are made with `fedmm ledger init`
        )

    def number(key: str, default: float | None) -> float:
        value = node_config.get(key, default)
        if value is None:
            raise ConfigError(f"node-config {key}", "is required: the site, not the server, sets its privacy budget", value=None, fix=f"start the SuperNode with {example}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"node-config {key}", "must be a number", value=value, fix=f"e.g. {key}=8")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"node-config {key}", "must be a number", value=value, fix=f"e.g. {key}=8") from None

    state_dir = node_config.get(protocol.NODE_STATE_DIR)
    if not state_dir:
        raise ConfigError("node-config state-dir", "is required: the site keeps its privacy ledger there", value=None, fix=f"start the SuperNode with {example}")
    require = node_config.get(protocol.NODE_REQUIRE_DP, True)
    if not isinstance(require, bool):
        raise ConfigError("node-config require-dp", "must be true or false", value=require, fix="e.g. require-dp=true")
    floor = number(protocol.NODE_MIN_BATCH, DEFAULT_MIN_BATCH)
    if not math.isfinite(floor) or floor != int(floor):
        raise ConfigError(f"node-config {protocol.NODE_MIN_BATCH}", "must be a whole number", value=floor, fix=f"e.g. {protocol.NODE_MIN_BATCH}={DEFAULT_MIN_BATCH}")
    return SitePolicy(
        state_dir=Path(str(state_dir)).expanduser().resolve(), epsilon_budget=number(protocol.NODE_EPSILON_BUDGET, None),
        delta=number(protocol.NODE_DELTA, 1e-5), min_noise_multiplier=number(protocol.NODE_MIN_NOISE, DEFAULT_MIN_NOISE), require_dp=require,
        min_batch_size=int(floor),
    )
