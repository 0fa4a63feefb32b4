"""Simulated federations: split a pool into sites, then degrade sites as real ones are.

Partitioning uses flwr-datasets' partitioners on an in-memory ``datasets.Dataset``
of row numbers and labels (no hub, nothing downloaded):

================  =====================================================================
``natural``       one site per value of a group column (speaker, subject, ``site``)
``iid``           uniform random split (IidPartitioner)
``dirichlet``     label skew: class proportions per site ~ Dirichlet(alpha) (DirichletPartitioner)
``pathological``  each site holds ``classes-per-site`` classes (PathologicalPartitioner)
``linear``        quantity skew: site k gets a share proportional to k+1 (LinearPartitioner)
``exponential``   quantity skew: share proportional to e^k (ExponentialPartitioner)
================  =====================================================================

Then, per site and seeded by (seed, site): missing modalities (a site loses each
modality with probability ``missing-modality-site-p``, as in FedMultimodal, Feng et
al., KDD 2023; each sample loses each modality with ``missing-modality-sample-p``;
at least one modality always stays), missing labels (``missing-label-p``), and
noisy labels (``label-noise``: a per-site class-transition matrix with ``1 - p`` on
the diagonal and ``p`` spread over the other classes by a Dirichlet(1) draw).
Finally each site normalises its sensor and tabular data (:func:`~fedmm.data.normalise.normalise`:
sensors by ``sensor-norm``; tabular with the site's statistics only when dp=false).

``sites = auto`` (``None``): a natural partition makes a site of every group, any other
partitioner :data:`DEFAULT_SITES`; :attr:`Federation.plan` holds the number used.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from fedmm.data.normalise import normalise
from fedmm.data.schema import UNLABELLED, MultimodalDataset
from fedmm.data.sources import Source
from fedmm.errors import ConfigError

__all__ = ["PARTITIONERS", "DEFAULT_SITES", "FederationPlan", "Federation", "partition_indices", "degrade_site", "build_federation"]

PARTITIONERS = ("auto", "natural", "iid", "dirichlet", "pathological", "linear", "exponential")
DEFAULT_SITES = 6  # sites=auto with a partitioner that is not natural


@dataclass(frozen=True, kw_only=True)
class FederationPlan:
    """How a pool becomes sites (run-config keys in brackets)."""

    partitioner: str = "auto"  # [partitioner] auto = natural when the source has a grouping, else iid
    sites: int | None = None  # [sites] None (auto): every natural group, else DEFAULT_SITES
    partition_by: str = ""  # [partition-by] group column for natural; "" = the source's own
    alpha: float = 0.5  # [dirichlet-alpha]
    classes_per_site: int = 2  # [classes-per-site]
    missing_modality_site_p: float = 0.0  # [missing-modality-site-p]
    missing_modality_sample_p: float = 0.0  # [missing-modality-sample-p]
    missing_modality_sites: str = ""  # [missing-modality-sites] e.g. "audio:0.5": that share of the sites lacks audio
    missing_label_p: float = 0.0  # [missing-label-p]
    label_noise: float = 0.0  # [label-noise]
    seed: int = 0  # [seed]
    site_statistics: bool = False  # tabular standardised with site statistics (dp=false only)
    sensor_norm: str = "auto"  # [sensor-norm] see fedmm.data.normalise

    def __post_init__(self) -> None:
        if self.partitioner not in PARTITIONERS:
            raise ConfigError("partitioner", "unknown partitioner", value=self.partitioner, fix=f"use one of: {', '.join(PARTITIONERS)}")
        if not self.alpha > 0:
            raise ConfigError("dirichlet-alpha", "must be > 0", value=self.alpha, fix="e.g. dirichlet-alpha=0.5 (smaller = more skew)")
        if self.classes_per_site < 1:
            raise ConfigError("classes-per-site", "must be >= 1", value=self.classes_per_site, fix="e.g. classes-per-site=2")
        for key, p, top in (
            ("missing-modality-site-p", self.missing_modality_site_p, 1.0), ("missing-modality-sample-p", self.missing_modality_sample_p, 1.0),
            ("missing-label-p", self.missing_label_p, 0.99), ("label-noise", self.label_noise, 0.99),
        ):
            if not 0.0 <= p <= top:
                raise ConfigError(key, f"must be a probability in [0, {top}]", value=p, fix=f"e.g. {key}=0.2")

        self.sites_losing()

    def sites_losing(self) -> dict[str, tuple[int, ...]]:
        """``missing-modality-sites`` as modality -> the indices of the sites that lack it
        (an exact share of the sites, drawn with the seed).

        >>> FederationPlan(sites=6, missing_modality_sites="audio:0.5").sites_losing()
        {'audio': (2, 3, 4)}
        """
        out: dict[str, tuple[int, ...]] = {}
        for part in (p.strip() for p in self.missing_modality_sites.split(",") if p.strip()):
            name, _, share = part.rpartition(":")
            try:
                fraction = float(share)
            except ValueError:
                fraction = -1.0
            if not name or not 0.0 <= fraction <= 1.0:
                raise ConfigError(
                    "missing-modality-sites", "must be MODALITY:SHARE entries with a share in [0, 1]", value=self.missing_modality_sites,
                    fix="e.g. missing-modality-sites='audio:0.5' (half the sites have no audio)",
                )
            sites = self.sites or 0  # auto: known once the federation is built (Federation.plan)
            order = np.random.default_rng([self.seed, zlib.crc32(name.encode())]).permutation(sites)
            out[name] = tuple(sorted(int(i) for i in order[: int(fraction * sites + 0.5)]))  # half rounds up
        return out

    @classmethod
    def from_config(cls, cfg: Any) -> FederationPlan:
        return cls(
            partitioner=cfg.partitioner, sites=cfg.sites, partition_by=cfg.partition_by, alpha=cfg.dirichlet_alpha,
            classes_per_site=cfg.classes_per_site, missing_modality_site_p=cfg.missing_modality_site_p,
            missing_modality_sample_p=cfg.missing_modality_sample_p, missing_modality_sites=cfg.missing_modality_sites,
            missing_label_p=cfg.missing_label_p,
            label_noise=cfg.label_noise, seed=cfg.seed, site_statistics=not cfg.dp, sensor_norm=cfg.sensor_norm,
        )


@dataclass(frozen=True)
class Federation:
    """The sites of a simulated federation, with what was done to each."""

    names: tuple[str, ...]
    sites: tuple[MultimodalDataset, ...]
    plan: FederationPlan
    partitioner: str  # as resolved from "auto"
    notes: tuple[dict[str, Any], ...]
    unassigned: int = 0  # pool samples no site holds (pathological leaves classes out; natural with fewer sites)
    skipped: dict[str, int] = field(default_factory=dict)  # rows the (lenient) loader skipped, per reason
    # sites of a natural split by 'site' whose training rows were all skipped: site -> reason -> rows
    sites_all_skipped: dict[str, dict[str, int]] = field(default_factory=dict)

    def site(self, name: str) -> MultimodalDataset:
        return self.sites[self.names.index(name)]

    def summary(self) -> dict[str, Any]:
        """Per-site counts per class and per modality, and the degradations: for the run's artifacts."""
        return {
            "plan": asdict(self.plan) | {"partitioner": self.partitioner},
            "synthetic": any(s.synthetic for s in self.sites),
            "unassigned_samples": self.unassigned,
            "skipped_while_loading": dict(self.skipped),
            "sites_all_rows_skipped": {name: dict(reasons) for name, reasons in self.sites_all_skipped.items()},
            "sites": {name: ds.counts() | note for name, ds, note in zip(self.names, self.sites, self.notes)},
        }


def partition_indices(pool: MultimodalDataset, plan: FederationPlan, natural_by: str | None) -> tuple[list[str], list[np.ndarray]]:
    """Row indices of each site (sorted) and the site names, via flwr-datasets."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    from flwr_datasets import partitioner as fp

    kind = plan.partitioner
    by = plan.partition_by or natural_by
    if kind == "auto":
        kind = "natural" if by else "iid"
    sites = plan.sites if plan.sites is not None else DEFAULT_SITES  # natural + auto: every group (below)
    columns: dict[str, Any] = {"row": np.arange(len(pool)), "label": pool.label}
    if kind == "natural":
        if not by:
            raise ConfigError("partitioner", "natural needs a group column and this source has none", value=kind, fix="set partition-by=COLUMN, or use partitioner='iid'")
        if by not in pool.groups:
            raise ConfigError("partition-by", f"no such group column (have: {', '.join(pool.groups) or 'none'})", value=by, fix="use one of those")
        columns[by] = pool.groups[by].astype(str)
    with _quiet_datasets():
        table = datasets.Dataset.from_dict(columns)
        if kind in ("iid", "linear", "exponential"):
            table = table.shuffle(seed=plan.seed)  # these assign contiguous blocks
        part: Any
        if kind == "natural":
            part = fp.NaturalIdPartitioner(partition_by=by)  # type: ignore[arg-type]
        elif kind == "iid":
            part = fp.IidPartitioner(num_partitions=sites)
        elif kind == "dirichlet":
            min_size = max(1, min(10, len(pool) // (4 * sites)))
            part = fp.DirichletPartitioner(num_partitions=sites, partition_by="label", alpha=plan.alpha, min_partition_size=min_size, self_balancing=False, seed=plan.seed)
        elif kind == "pathological":
            part = fp.PathologicalPartitioner(num_partitions=sites, partition_by="label", num_classes_per_partition=plan.classes_per_site, seed=plan.seed)
        elif kind == "linear":
            part = fp.LinearPartitioner(num_partitions=sites)
        else:
            part = fp.ExponentialPartitioner(num_partitions=sites)
        part.dataset = table
        try:
            total = part.num_partitions
            if kind == "natural" and plan.sites is None:
                sites = total
            loaded = [part.load_partition(i) for i in range(total if kind != "natural" else min(total, sites))]
        except ValueError as err:  # flwr-datasets: impossible settings for this pool
            key = {"dirichlet": "dirichlet-alpha", "pathological": "classes-per-site"}.get(kind, "partitioner")
            raise ConfigError(key, f"{kind} cannot split {len(pool)} samples into {sites} sites ({err})", value=kind, fix="use fewer sites, a larger dirichlet-alpha, fewer classes-per-site, or another partitioner") from None
        if kind == "natural":
            ids = part.partition_id_to_natural_id
            if sites > total:
                raise ConfigError("sites", f"{by!r} has only {total} values, so only {total} natural sites", value=sites, fix=f"set sites <= {total}, or another partitioner")
            names = [str(ids[i]) for i in range(sites)]
        else:
            names = [f"site-{i}" for i in range(total)]
        rows = [np.sort(np.asarray(loaded[i]["row"], dtype=np.int64)) for i in range(len(names))]
    for name, r in zip(names, rows):
        if len(r) == 0:
            raise ConfigError("partitioner", f"site {name} received no sample ({kind}, {len(pool)} samples, {sites} sites)", value=kind, fix="use fewer sites, a larger alpha, or another partitioner")
    return names, rows


class _quiet_datasets:
    """Silence HF datasets' progress bars while partitioning."""

    def __enter__(self) -> None:
        import datasets

        self._was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
        self._stderr = contextlib.redirect_stderr(io.StringIO())  # flwr-datasets' own tqdm bars
        self._stderr.__enter__()

    def __exit__(self, *exc: object) -> None:
        import datasets

        if self._was:
            datasets.utils.logging.enable_progress_bar()
        self._stderr.__exit__(None, None, None)


def degrade_site(ds: MultimodalDataset, plan: FederationPlan, site_index: int) -> tuple[MultimodalDataset, dict[str, Any]]:
    """Apply missing modalities, missing labels and label noise to one site (seeded)."""
    rng = np.random.default_rng([plan.seed, site_index, zlib.crc32(b"degrade")])
    m = len(ds.schema.modalities)
    present = ds.present.copy()
    note: dict[str, Any] = {}
    had = ds.present.any(axis=0)  # modalities this site has at all
    if plan.missing_modality_site_p > 0 and had.sum() > 1:
        lost = (rng.random(m) < plan.missing_modality_site_p) & had
        if not (had & ~lost).any():
            lost[rng.choice(np.flatnonzero(had))] = False
        present[:, lost] = False
        note["modalities_lost"] = [ds.schema.names[j] for j in np.flatnonzero(lost)]
    for name, losing in plan.sites_losing().items():
        if name not in ds.schema.names:
            raise ConfigError("missing-modality-sites", f"no modality {name!r} in the data", value=plan.missing_modality_sites, fix=f"use one of {', '.join(ds.schema.names)}")
        if site_index in losing:
            present[:, ds.schema.names.index(name)] = False
            note["modalities_lost"] = sorted({*note.get("modalities_lost", []), name})
    if plan.missing_modality_sites and had.any() and not (present.any(axis=0) & had).any():
        raise ConfigError(
            "missing-modality-sites", f"site {site_index} would lose every modality it has", value=plan.missing_modality_sites,
            fix="leave each site at least one modality (lower the shares)",
        )
    if plan.missing_modality_sample_p > 0 and m > 1:
        before = int(present.sum())
        present &= ~(rng.random(present.shape) < plan.missing_modality_sample_p)
        note["modality_cells_dropped"] = before - int(present.sum())
    for i in np.flatnonzero(~present.any(axis=1) & ds.present.any(axis=1)):
        # every sample keeps at least one modality it had (and, if possible, one the site kept)
        kept_by_site = np.flatnonzero(ds.present[i] & (present.any(axis=0) | ~had))
        choices = kept_by_site if len(kept_by_site) else np.flatnonzero(ds.present[i])
        present[i, rng.choice(choices)] = True
    features = dict(ds.features)
    for j, name in enumerate(ds.schema.names):
        if (~present[:, j] & ds.present[:, j]).any():
            values = np.array(features[name])
            values[~present[:, j]] = 0
            features[name] = values
    label = np.array(ds.label)
    if plan.label_noise > 0:
        k = ds.schema.num_classes
        matrix = np.zeros((k, k))
        for c in range(k):
            others = np.delete(np.arange(k), c)
            matrix[c, others] = plan.label_noise * rng.dirichlet(np.ones(k - 1))
            matrix[c, c] = 1.0 - plan.label_noise
        labelled = label >= 0
        noisy = label.copy()
        noisy[labelled] = [rng.choice(k, p=matrix[c]) for c in label[labelled]]
        note["labels_flipped"] = int((noisy != label).sum())
        note["transition_matrix"] = np.round(matrix, 4).tolist()
        label = noisy
    if plan.missing_label_p > 0:
        hide = rng.random(len(label)) < plan.missing_label_p
        label[hide] = UNLABELLED
        note["labels_hidden"] = int(hide.sum())
    return ds.replace(features=features, present=present, label=label), note


def build_federation(source: Source, plan: FederationPlan) -> Federation:
    """Partition ``source.pool`` into sites and degrade each (deterministic in ``plan``)."""
    return _build(source, plan)


@functools.lru_cache(maxsize=4)
def _build(source: Source, plan: FederationPlan) -> Federation:
    if len(source.pool) == 0:
        raise ConfigError("data", f"{source.name} has no training sample to split into sites", value=source.name, fix="mark rows split=train, or point data at the training data")
    names, rows = partition_indices(source.pool, plan, source.natural_by)
    kind = plan.partitioner if plan.partitioner != "auto" else ("natural" if (plan.partition_by or source.natural_by) else "iid")
    plan = replace(plan, sites=len(names))  # sites=auto resolved
    # the loader's skips per site are a site's own only when the sites are the manifest's 'site' column
    by_site = source.skipped_by_site if kind == "natural" and (plan.partition_by or source.natural_by) == "site" else {}
    sites, notes = [], []
    for i, (name, r) in enumerate(zip(names, rows)):
        site, note = degrade_site(source.pool.subset(r).replace(skipped=dict(by_site.get(name, {}))), plan, i)
        sites.append(normalise(site, sensor_norm=plan.sensor_norm, site_statistics=plan.site_statistics))
        notes.append(note)
    unassigned = len(source.pool) - sum(len(r) for r in rows)
    held = set(source.pool.groups["site"].tolist()) if by_site else set()
    lost = {gone: dict(reasons) for gone, reasons in by_site.items() if gone not in held}  # the loader warned about each
    return Federation(tuple(names), tuple(sites), plan, kind, tuple(notes), unassigned, dict(source.pool.skipped), lost)
