"""One data site's round, testable without Flower.

``check budget -> train -> record the spend -> return the update``. The
ClientApp only translates Flower messages to and from :func:`train_round`.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data.avmnist import SPEAKERS, MultimodalArrays
from fedmm.errors import BudgetExceededError, ConfigError, PrivacyError
from fedmm.models import build_model, prepare_inputs
from fedmm.privacy.accounting import PrivacyReport, SiteAccountant, calibrate_noise_multiplier
from fedmm.training import DPSettings, steps_per_epoch, train

__all__ = ["SitePlan", "SiteState", "SiteUpdate", "plan_site", "site_name", "train_round"]


@dataclass(frozen=True)
class SitePlan:
    """How a site trains under DP for the whole run, fixed before its first round."""

    num_examples: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    planned_epsilon: float


@dataclass
class SiteState:
    """What a site keeps between rounds: its plan and its accountant."""

    plan: SitePlan | None
    accountant: SiteAccountant

    def to_json(self) -> str:
        """Serialise for the node's persistent state."""
        plan = None if self.plan is None else self.plan.__dict__
        return json.dumps({"plan": plan, "accountant": json.loads(self.accountant.to_json())})

    @classmethod
    def from_json(cls, text: str) -> SiteState:
        """Restore a state saved by :meth:`to_json`."""
        data = json.loads(text)
        plan = None if data["plan"] is None else SitePlan(**data["plan"])
        return cls(plan=plan, accountant=SiteAccountant.from_json(json.dumps(data["accountant"])))


@dataclass(frozen=True)
class SiteUpdate:
    """What a site sends back after a round."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    privacy: PrivacyReport | None


def plan_site(cfg: RunConfig, num_examples: int) -> SitePlan:
    """Fix the sample rate, steps and noise multiplier of a site for the whole run.

    With ``noise-multiplier = "auto"`` the noise is calibrated so that after
    ``rounds`` rounds the site's epsilon is at most ``target-epsilon``.
    """
    per_epoch = steps_per_epoch(num_examples, cfg.batch_size)
    sample_rate = 1.0 / per_epoch
    steps_per_round = cfg.local_epochs * per_epoch
    total_steps = cfg.rounds * steps_per_round
    noise = cfg.noise_multiplier
    if noise is None:
        noise = calibrate_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta,
            sample_rate=sample_rate, steps=total_steps, accountant=cfg.accountant,
        )
    trial = SiteAccountant(cfg.accountant)
    planned = trial.projected_epsilon(cfg.target_delta, noise_multiplier=noise, sample_rate=sample_rate, steps=total_steps) if noise > 0 else float("inf")
    return SitePlan(num_examples, sample_rate, steps_per_round, noise, planned)


def train_round(
    *,
    cfg: RunConfig,
    site: str,
    arrays: MultimodalArrays,
    global_weights: Mapping[str, torch.Tensor],
    server_round: int,
    state: SiteState,
) -> SiteUpdate:
    """Run one round at one site; ``state`` is updated in place (plan, accountant).

    Raises
    ------
    BudgetExceededError
        Before any training, when this round would take the site's epsilon over
        ``target-epsilon`` (the site's budget).
    """
    model = build_model(cfg.model, seed=cfg.seed)
    model.load_state_dict(dict(global_weights))
    arrays = prepare_inputs(cfg.model, arrays)
    dp = None
    if cfg.dp:
        if state.plan is None or state.plan.num_examples != len(arrays):
            state.plan = plan_site(cfg, len(arrays))
        plan = state.plan
        if plan.noise_multiplier <= 0:
            raise BudgetExceededError(f"site {site}: noise-multiplier 0 gives no differential privacy; set dp=false to train without it")
        projected = state.accountant.projected_epsilon(
            cfg.target_delta, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps_per_round
        )
        if projected > cfg.target_epsilon:
            raise BudgetExceededError(
                f"site {site} refuses round {server_round}: it would take epsilon from "
                f"{state.accountant.epsilon(cfg.target_delta):.3f} to "
                f"{projected:.3f} (delta={cfg.target_delta}, {cfg.accountant}), over the budget "
                f"target-epsilon={cfg.target_epsilon}. Fix: raise target-epsilon, or run fewer rounds"
            )
        dp = DPSettings(
            noise_multiplier=plan.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
            grad_sample_mode=cfg.grad_sample_mode, accountant=state.accountant,
        )
    steps_before = state.accountant.steps
    loss = train(
        model, arrays, epochs=cfg.local_epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        momentum=cfg.momentum, seed=zlib.crc32(f"{cfg.seed}/{site}/{server_round}".encode()), dp=dp,
    )
    report = None
    if dp is not None and state.plan is not None:
        taken = state.accountant.steps - steps_before
        if taken != state.plan.steps_per_round:
            raise PrivacyError(f"site {site}: DP-SGD took {taken} steps, the plan said {state.plan.steps_per_round}; refusing to release the update")
        # The history now is exactly the one the budget check evaluated: reuse its epsilon.
        report = state.accountant.report(cfg.target_delta, epsilon=projected)
    return SiteUpdate({k: v.detach().clone() for k, v in model.state_dict().items()}, len(arrays), loss, report)


def site_name(node_config: Mapping[str, object], cfg: RunConfig) -> str:
    """Which site this node is: ``site`` in deployment, ``partition-id`` in simulation.

    >>> site_name({"partition-id": 1, "num-partitions": 6}, RunConfig())
    'jackson'
    """
    if protocol.NODE_SITE in node_config:
        name = str(node_config[protocol.NODE_SITE])
        if name not in SPEAKERS:
            raise ConfigError("node-config site", f"not a site of {cfg.data}", value=name, fix=f"use one of {', '.join(SPEAKERS)}")
        return name
    if protocol.NODE_PARTITION_ID not in node_config:
        raise ConfigError("node-config", "has neither 'site' nor 'partition-id'", value=dict(node_config), fix="start the SuperNode with --node-config \"site='george'\"")
    partition = int(node_config[protocol.NODE_PARTITION_ID])  # type: ignore[call-overload]
    available = min(cfg.sites, len(SPEAKERS))
    if not 0 <= partition < available:
        raise ConfigError(
            "sites", f"simulation node with partition-id {partition}, but only {available} sites are configured",
            value=cfg.sites, fix=f"run with as many supernodes as sites, e.g. --federation-config \"num-supernodes={available}\"",
        )
    return SPEAKERS[partition]
