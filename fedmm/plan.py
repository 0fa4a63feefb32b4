"""A run's parts, built once from its configuration: the one place that resolves ``auto``.

:class:`fedmm.config.RunConfig` checks each value on its own. :class:`RunPlan` builds
what the run is made of from it, and so checks everything that needs the rest of
fedmm: the preprocessing of each modality, the model recipe (fusion and encoders), the
simulated federation, the augmentation, the simulated sites' budgets and client-level
DP (with distributed noise: that ``secagg-clip-range`` leaves every site's noise share
whole, :class:`fedmm.privacy.client_dp.ShareCheck`). The server and every site build the
same plan from the same run config.

:meth:`RunPlan.resolved` is the configuration with every ``auto`` replaced by what
the run uses; the server writes it to ``config.toml``, so a run replays with the same
values even if a later fedmm changes a default. Two values depend on more than the
configuration and are recorded where they are decided: the noise multiplier (per
site, from its data size; ``privacy.json``) and the partitioner a natural split uses
(``federation.json``, and ``config.toml`` when the server holds the data).

>>> plan = RunPlan.from_run_config({"rounds": 3})
>>> plan.model.fusion, plan.model.options.image_encoder
('concat', 'scattering')
>>> RunPlan.from_run_config({"model": "fusion-of-everything"})
Traceback (most recent call last):
...
fedmm.errors.ConfigError: config key 'model': unknown model (got 'fusion-of-everything'). Fix: use auto or one of: attention, concat, embedding, gated, late
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmm.config import RunConfig
from fedmm.data.augment import parse_augment
from fedmm.data.normalise import SensorNorm
from fedmm.data.partition import FederationPlan
from fedmm.data.preprocess import Preprocessing
from fedmm.data.schema import ModalityKind, Schema
from fedmm.models.recipe import ModelRecipe
from fedmm.privacy.client_dp import ClientDPPlan
from fedmm.privacy.policy import parse_site_budgets

__all__ = ["RunPlan", "AUTO_SERVER_LR", "batch_size", "server_learning_rate"]

# Server learning rate of ``auto`` per strategy (docs/training.md#measured).
AUTO_SERVER_LR: dict[str, float] = {
    "fedavg": 1.0, "fedprox": 1.0, "fedavgm": 0.3, "fedadam": 0.03, "fedyogi": 0.03, "fedadagrad": 0.1,
}


SMALL_EPSILON = 4.0  # below this target-epsilon, batch-size=auto takes the larger batch
LARGE_BATCH, DEFAULT_BATCH = 256, 64


def batch_size(cfg: RunConfig) -> int:
    """``batch-size``, or what ``auto`` resolves to: 256 under DP with target-epsilon below 4 (the noise per
    record shrinks with the batch; measured in docs/benchmarks.md#recipes-at-small-epsilon), else 64."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    return LARGE_BATCH if cfg.dp and cfg.target_epsilon < SMALL_EPSILON else DEFAULT_BATCH


def server_learning_rate(cfg: RunConfig) -> float:
    """``server-learning-rate``, or what ``auto`` resolves to for ``strategy``."""
    return cfg.server_learning_rate if cfg.server_learning_rate is not None else AUTO_SERVER_LR[cfg.strategy]


@dataclass(frozen=True)
class RunPlan:
    """Everything a run is made of, checked together.

    Build it with :meth:`from_config` (or :meth:`from_run_config` from Flower's flat
    mapping); the fields are the parts each consumer needs.
    """

    config: RunConfig
    preprocessing: Preprocessing
    model: ModelRecipe
    federation: FederationPlan
    augment: Mapping[ModalityKind, tuple[str, ...]]
    site_budgets: Mapping[str, float]  # simulated sites' lifetime budgets ("*": every other site)
    client_dp: ClientDPPlan | None

    @classmethod
    def from_config(cls, cfg: RunConfig) -> RunPlan:
        """Build and check every part of the run described by ``cfg``.

        Raises
        ------
        fedmm.errors.ConfigError
            Naming the key, the value and the fix, for anything a part refuses.
        """
        SensorNorm.parse(cfg.sensor_norm).check(dp=cfg.dp)
        return cls(
            config=cfg,
            preprocessing=Preprocessing.from_config(cfg),
            model=ModelRecipe.from_config(cfg),
            federation=FederationPlan.from_config(cfg),
            augment=parse_augment(cfg.augment),
            site_budgets=parse_site_budgets(cfg.site_budgets, cfg.target_epsilon),
            client_dp=ClientDPPlan.from_config(cfg),
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunPlan:
        """:meth:`from_config` of :meth:`RunConfig.from_run_config` (unknown keys, types, ranges first)."""
        return cls.from_config(RunConfig.from_run_config(run_config))

    def learning_rate(self, schema: Schema) -> float:
        """The sites' SGD learning rate: ``learning-rate``, or the model's tuned rate for ``auto``."""
        if self.config.learning_rate is not None:
            return self.config.learning_rate
        return self.model.learning_rate(schema, dp=self.config.dp)

    def momentum(self, schema: Schema) -> float:
        """The sites' SGD momentum: ``momentum``, or the model's for ``auto`` (0.9 without DP and deep encoders, else 0)."""
        if self.config.momentum is not None:
            return self.config.momentum
        return self.model.momentum(schema, dp=self.config.dp)

    def with_sites(self, sites: int) -> RunPlan:
        """This plan with ``sites`` set (``sites=auto`` resolved from the data); checked again."""
        return self if self.config.sites == sites else RunPlan.from_config(self.config.replace(sites=sites))

    def resolved(self, *, schema: Schema | None = None, partitioner: str | None = None, sites: int | None = None) -> RunConfig:
        """The configuration with every ``auto`` this plan can decide replaced by its value.

        ``schema`` (the model's input schema) decides ``learning-rate=auto`` and
        ``sensor-length=auto``; ``partitioner`` is the one the federation used
        (``Federation.partitioner``) and ``sites`` its number of sites.
        """
        changes: dict[str, Any] = {
            "model": self.model.fusion, "image_encoder": self.model.options.image_encoder,
            "sensor_norm": SensorNorm.parse(self.config.sensor_norm).text,
            "server_learning_rate": server_learning_rate(self.config), "batch_size": batch_size(self.config),
        }
        if schema is not None:
            changes["learning_rate"] = self.learning_rate(schema)
            changes["momentum"] = self.momentum(schema)
            lengths = {m.shape[-1] for m in schema.modalities if m.kind is ModalityKind.SENSOR}
            if self.config.sensor_length is None and len(lengths) == 1:
                changes["sensor_length"] = lengths.pop()
        if partitioner is not None:
            changes["partitioner"] = partitioner
        if sites is not None:
            changes["sites"] = sites
        return self.config.replace(**changes)
