"""Which site a node is, its training data, and the loss's class weights.

A deployed site reads its own source (``data`` in its node config) and fits it to the
model input the server sends (:func:`fit_to_server`: the federation's classes, its sensor
series length), so that what a site trains under never depends on which of its records
it holds; a simulated site is one part of the federation built from the run config.
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
from fedmm.data.checks import SkipReason
from fedmm.data.partition import FederationPlan, build_federation
from fedmm.data.normalise import normalise
from fedmm.data.preprocess import Preprocessing
from fedmm.data.schema import UNLABELLED, ModalityKind, MultimodalDataset, Schema
from fedmm.data.sources import Source, load_source
from fedmm.errors import ConfigError, FederationError
from fedmm.site.training import balanced_class_weights

__all__ = ["site_data", "class_weights", "fit_to_server"]

_log = logging.getLogger("fedmm.site")


@functools.lru_cache(maxsize=2)
def _site_data_cache(source: object, dp: bool, sensor_norm: str, server: Schema | None = None, lenient: bool = False) -> MultimodalDataset:
    pool: MultimodalDataset = source.pool  # type: ignore[attr-defined]
    if server is not None:
        pool = fit_to_server(pool, server, lenient=lenient)
    return normalise(pool, sensor_norm=sensor_norm, site_statistics=not dp)


def fit_to_server(pool: MultimodalDataset, server: Schema, *, lenient: bool = False) -> MultimodalDataset:
    """A deployed site's loaded (not yet normalised) data fitted to the server's model input ``server``.

    A site builds its classes from its own labels (``classes`` empty: the sorted labels it
    holds) and its sensor length from its own longest series (``sensor-length=auto``), so on
    their own both would depend on single records. Fitted here, before normalisation:

    - **classes**: the federation's (the server's list, in its order). A site that lacks some
      of them is normal (non-IID): its labels are renumbered into the server's list. A label
      the federation does not have is a real incompatibility: strict, a
      :class:`FederationError` (the same whatever the number of such records); lenient, those
      records are skipped and counted (``unknown label``), as a manifest skips a label not in
      ``classes``;
    - **sensor series**: the server's length. Shorter ones are padded with zeros at the end,
      longer ones cut to it (a warning in the site's log), as a fixed ``sensor-length`` pads
      and cuts at loading;
    - **modality order**: the server's, when the site has the same modalities.

    Anything else that differs (modalities, channels, other shapes) is left for the round's
    check against the server's schema (:func:`fedmm.site.round.train_round`). The errors'
    text is for the site's own log: the server is told only that the round failed
    (:mod:`fedmm.site.runner`).

    >>> import numpy as np
    >>> from fedmm.data.schema import Modality
    >>> sensor = Modality("acc", ModalityKind.SENSOR, (1, 3), "series")
    >>> pool = MultimodalDataset(Schema((sensor,), ("b",)), {"acc": np.ones((1, 1, 3), np.float32)}, np.ones((1, 1), bool), np.array([0]))
    >>> server = Schema((Modality("acc", ModalityKind.SENSOR, (1, 5), "series"),), ("a", "b", "c"))
    >>> fitted = fit_to_server(pool, server)
    >>> fitted.schema == server, fitted.label.tolist(), fitted.features["acc"].tolist()
    (True, [1], [[[1.0, 1.0, 1.0, 0.0, 0.0]]])
    """
    out = _fit_classes(pool, server.classes, lenient=lenient)
    theirs = {m.name: m for m in server.modalities}
    features, modalities = dict(out.features), []
    for m in out.schema.modalities:
        target = theirs.get(m.name)
        if m.kind is ModalityKind.SENSOR and target is not None and target.kind is ModalityKind.SENSOR and target.shape[-1] != m.shape[-1]:
            length, values = target.shape[-1], features[m.name]
            if values.shape[-1] > length:
                _log.warning(
                    "[fedmm] sensor column %r: the site's series (up to %d steps) are cut to the federation's sensor length %d "
                    "(the server's model input). Fix: to keep them whole, set sensor-length=%d (or more) in the run config",
                    m.name, values.shape[-1], length, values.shape[-1],
                )
                values = values[..., :length]
            else:
                values = np.concatenate([values, np.zeros((*values.shape[:-1], length - values.shape[-1]), values.dtype)], axis=-1)
            features[m.name] = np.ascontiguousarray(values)
            m = dataclasses.replace(m, shape=(*m.shape[:-1], length))
        modalities.append(m)
    order = list(range(len(modalities)))
    if sorted(theirs) == sorted(m.name for m in modalities):
        position = {name: i for i, name in enumerate(m.name for m in server.modalities)}
        order.sort(key=lambda j: position[modalities[j].name])
    schema = dataclasses.replace(out.schema, modalities=tuple(modalities[j] for j in order))
    return out.replace(schema=schema, features=features, present=out.present[:, order])


def _fit_classes(pool: MultimodalDataset, classes: tuple[str, ...], *, lenient: bool) -> MultimodalDataset:
    """``pool`` with its labels numbered in ``classes`` (see :func:`fit_to_server`)."""
    mine = pool.schema.classes
    if mine == classes:
        return pool
    index = {c: i for i, c in enumerate(classes)}
    labelled = pool.label != UNLABELLED
    held = sorted({mine[i] for i in np.unique(pool.label[labelled])})
    foreign = [c for c in held if c not in index]
    if foreign:
        outside = labelled & np.isin(pool.label, [mine.index(c) for c in foreign])
        if not lenient:
            shown = ", ".join(repr(c) for c in foreign[:20]) + (" ..." if len(foreign) > 20 else "")
            raise FederationError(
                f"the site's data has labels the federation's model does not have: {shown} ({int(outside.sum())} records); "
                f"its classes are {list(classes)[:50]}. Fix: correct those labels or remove their records, set 'lenient' to skip "
                "them, or name every class in the run config's 'classes' (and in the server's held-out data)"
            )
        _log.warning("[fedmm] %d records skipped: their labels (%s) are not among the federation's classes (unknown label)", int(outside.sum()), ", ".join(foreign))
        skipped = dict(pool.skipped)
        reason = str(SkipReason.UNKNOWN_LABEL)
        skipped[reason] = skipped.get(reason, 0) + int(outside.sum())
        pool = pool.subset(np.flatnonzero(~outside)).replace(skipped=skipped)
        labelled = pool.label != UNLABELLED
    renumber = np.array([index.get(c, UNLABELLED) for c in mine] or [UNLABELLED], dtype=np.int64)
    label = np.where(labelled, renumber[np.where(labelled, pool.label, 0)], UNLABELLED).astype(np.int64)
    return pool.replace(schema=dataclasses.replace(pool.schema, classes=tuple(classes)), label=label)


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

    When the column names other sites only, the site refuses: training on rows that name other
    sites would spend their records under this site's ledger, which their own ledgers never see.
    """
    column = source.pool.groups.get("site") if source.natural_by == "site" else None
    if column is None:
        return source
    values = np.asarray(column).astype(str)
    mine = np.flatnonzero(values == name)
    if len(mine) == 0:  # the rows are other sites' (a wrong manifest, or a wrong name): never trained on here
        names = sorted(set(values.tolist()))
        raise ConfigError(
            "node-config data", f"has a 'site' column whose {len(values)} rows name other sites ({', '.join(names[:8])}{' ...' if len(names) > 8 else ''}), "
            f"none this site ({name!r}); training on them would spend their records under this site's ledger",
            value=spec, fix="give the site the name its rows carry (the site file's name), point data at this site's own manifest, "
            "or drop the 'site' column from a manifest that is this site's whole",
        )
    if len(mine) == len(values):
        return source
    return dataclasses.replace(source, pool=source.pool.subset(mine))


def check_own_data(node_config: Mapping[str, object], cfg: RunConfig) -> None:
    """Refuse a deployed site without its own ``data`` a run config whose data names files on its machine.

    A site's own data is its site file's ``data``; without it the site takes only a built-in
    data set (trials), never files the server's run config names (which it would train on,
    and the kind of failure would tell whether they exist)."""
    deployed = any(k in node_config for k in (protocol.NODE_STATE_DIR, protocol.NODE_KEY, protocol.NODE_EPSILON_BUDGET))
    kind, _, location = cfg.data.partition(":")
    if deployed and protocol.NODE_DATA not in node_config and (kind == "manifest" or (kind != "synthetic" and location)):  # synthetic:N: a size
        raise ConfigError("node-config data", f"is not set, and the run config's data={cfg.data!r} names files on this machine: a "
                          "deployed site reads only its own data; nothing was read or spent", fix="set data in the site's file "
                          "(e.g. data = \"manifest:/srv/site/manifest.csv\"); without it a site takes part in trials on built-in data only")


def site_data(node_config: Mapping[str, object], cfg: RunConfig, *, server: Schema | None = None) -> tuple[str, MultimodalDataset]:
    """Which site this node is, and its training data.

    - ``data`` in the node config (deployment): the site's own source, e.g.
      ``data='manifest:/srv/site/manifest.csv'``, trained on whole; its name is the
      node config's ``site``, required with it (never the data's path). With ``server`` (the model input the server
      sent), fitted to it (:func:`fit_to_server`). Bad rows are skipped only where the node config says
      ``lenient=true`` (the run config's ``lenient`` is the server's, and is not taken);
    - ``site`` alone: that site of the federation simulated from the run config;
    - ``partition-id`` (simulation): the site with that index.

    >>> site_data({"partition-id": 1, "num-partitions": 6}, RunConfig())[0]
    'jackson'
    """
    prep = Preprocessing.from_config(cfg)
    if protocol.NODE_DATA in node_config:
        spec = str(node_config[protocol.NODE_DATA])
        if protocol.NODE_SITE not in node_config:  # its name would be the data's local path, in every report and ledger entry
            raise ConfigError("node-config site", "is required with data: without it the site's name is its data's path, which the server would read",
                              value=spec, fix="add site='NAME' to the SuperNode's --node-config (`fedmm site` sets it from the site file's name)")
        # Which of its records a site skips is its own setting, never the server's: a server's classes='X' with lenient
        # would keep only the class-X records, and the sample rate in the site's privacy report would count them.
        lenient = node_config.get(protocol.NODE_LENIENT, False)
        if not isinstance(lenient, bool):
            raise ConfigError(f"node-config {protocol.NODE_LENIENT}", "must be true or false", value=lenient, fix="e.g. lenient = true in the site file")
        source = load_source(spec, prep, classes=cfg.class_list, lenient=lenient, test_fraction=0.0)
        name = str(node_config[protocol.NODE_SITE])
        if len(source.pool) == 0:
            raise ConfigError("node-config data", "holds no training row (all are split=test)", value=spec, fix="mark this site's rows split=train")
        return name, _site_data_cache(own_rows(source, name, spec), cfg.dp, cfg.sensor_norm, server, lenient)
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
