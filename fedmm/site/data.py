"""Which site a node is, its training data, and the loss's class weights.

A deployed site reads its own source (``data`` in its node config); a simulated site
is one part of the federation built from the run config.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping

import numpy as np

import torch

from fedmm import protocol
from fedmm.config import RunConfig
from fedmm.data.partition import FederationPlan, build_federation
from fedmm.data.normalise import normalise
from fedmm.data.preprocess import Preprocessing
from fedmm.data.schema import MultimodalDataset
from fedmm.data.sources import Source, load_source
from fedmm.errors import ConfigError
from fedmm.site.training import balanced_class_weights

__all__ = ["site_data", "class_weights"]

_log = logging.getLogger("fedmm.site")


@functools.lru_cache(maxsize=2)
def _site_data_cache(source: object, dp: bool, sensor_norm: str) -> MultimodalDataset:
    return normalise(source.pool, sensor_norm=sensor_norm, site_statistics=not dp)  # type: ignore[attr-defined]


def class_weights(cfg: RunConfig, data: MultimodalDataset) -> torch.Tensor | None:
    """The loss's class weights: fixed ones from the config (checked against the classes),
    ``balanced`` from the site's own labels (RunConfig refuses that under DP), or None."""
    fixed = cfg.fixed_class_weights()
    if fixed is not None:
        if len(fixed) != data.schema.num_classes:
            raise ConfigError(
                "class-weights", f"has {len(fixed)} weights for {data.schema.num_classes} classes {list(data.schema.classes)}",
                value=cfg.class_weights, fix="give one weight per class, in class order",
            )
        return torch.tensor(fixed, dtype=torch.float32)
    if cfg.class_weights.strip() == "balanced":
        return balanced_class_weights(data.label, data.schema.num_classes)
    return None


@functools.lru_cache(maxsize=2)  # per loaded source (cached itself): the same object every round, so the data cache below holds
def own_rows(source: Source, name: str, spec: str) -> Source:
    """A manifest with a ``site`` column holds rows of several sites: a site trains on the rows that name it, only.

    One manifest can then serve a trial of several sites on one machine (docs/deploy.md); a site's own
    manifest without that column is its data whole.

    When the column names other sites only, the manifest is taken as the site's own, whole, with a
    logged warning (a site's own export may carry a site column of its own naming).
    """
    column = source.pool.groups.get("site") if source.natural_by == "site" else None
    if column is None:
        return source
    values = np.asarray(column).astype(str)
    mine = np.flatnonzero(values == name)
    if len(mine) == 0:  # the column names no row this site's: the manifest is the site's own, whole (logged)
        names = sorted(set(values.tolist()))
        _log.warning(
            "[fedmm] site %s: its manifest's site column names %s, not this site; training on all %d of its rows "
            "(name the site as its rows are named to train on those only)", name, ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""), len(values),
        )
        return source
    if len(mine) == len(values):
        return source
    return dataclasses.replace(source, pool=source.pool.subset(mine))


def site_data(node_config: Mapping[str, object], cfg: RunConfig) -> tuple[str, MultimodalDataset]:
    """Which site this node is, and its training data.

    - ``data`` in the node config (deployment): the site's own source, e.g.
      ``data='manifest:/srv/site/manifest.csv'``, trained on whole; its name is the
      node config's ``site`` (or the source's);
    - ``site`` alone: that site of the federation simulated from the run config;
    - ``partition-id`` (simulation): the site with that index.

    >>> site_data({"partition-id": 1, "num-partitions": 6}, RunConfig())[0]
    'jackson'
    """
    prep = Preprocessing.from_config(cfg)
    if protocol.NODE_DATA in node_config:
        spec = str(node_config[protocol.NODE_DATA])
        source = load_source(spec, prep, classes=cfg.class_list, lenient=cfg.lenient, test_fraction=0.0)
        name = str(node_config.get(protocol.NODE_SITE, spec))
        if len(source.pool) == 0:
            raise ConfigError("node-config data", "holds no training row (all are split=test)", value=spec, fix="mark this site's rows split=train")
        return name, _site_data_cache(own_rows(source, name, spec), cfg.dp, cfg.sensor_norm)
    source = load_source(cfg.data, prep, classes=cfg.class_list, lenient=cfg.lenient, test_fraction=cfg.test_fraction)
    federation = build_federation(source, FederationPlan.from_config(cfg))
    if protocol.NODE_SITE in node_config:
        name = str(node_config[protocol.NODE_SITE])
        if name not in federation.names:
            raise ConfigError("node-config site", f"not a site of {cfg.data}", value=name, fix=f"use one of {', '.join(federation.names)}")
        return name, federation.site(name)
    if protocol.NODE_PARTITION_ID not in node_config:
        raise ConfigError("node-config", "has neither 'site', 'data' nor 'partition-id'", value=dict(node_config), fix="start the SuperNode with --node-config \"site='george'\"")
    partition = int(node_config[protocol.NODE_PARTITION_ID])  # type: ignore[call-overload]
    available = len(federation.names)
    if not 0 <= partition < available:
        raise ConfigError(
            "sites", f"simulation node with partition-id {partition}, but only {available} sites are configured",
            value=cfg.sites, fix=f"run with as many supernodes as sites, e.g. --federation-config \"num-supernodes={available}\"",
        )
    return federation.names[partition], federation.sites[partition]
