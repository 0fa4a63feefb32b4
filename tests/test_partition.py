"""Simulated federations (flwr-datasets partitioners), degradations, sources, imbalance rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmm.config import RunConfig
from fedmm.data.partition import FederationPlan, build_federation, degrade_site, partition_indices
from fedmm.data.preprocess import Preprocessing
from fedmm.data.schema import UNLABELLED
from fedmm.data.sources import load_source
from fedmm.data.synthetic import make_synthetic
from fedmm.errors import ConfigError
from fedmm.plan import RunPlan
from fedmm.models import Objective, OutputLayout

PREP = Preprocessing()
POOL = make_synthetic(3000, seed=5)


def _skew(alpha: float, seed: int) -> float:
    """Mean over sites of the largest class share: 0.1 for perfectly balanced 10 classes, 1.0 for one class."""
    _, rows = partition_indices(POOL, FederationPlan(partitioner="dirichlet", sites=10, alpha=alpha, seed=seed), None)
    shares = [np.bincount(POOL.label[r], minlength=10).max() / len(r) for r in rows]
    return float(np.mean(shares))


def test_the_same_seed_gives_the_same_partition_and_another_seed_another() -> None:
    plan = FederationPlan(partitioner="dirichlet", sites=6, alpha=0.3, seed=7)
    a = partition_indices(POOL, plan, None)[1]
    b = partition_indices(POOL, plan, None)[1]
    c = partition_indices(POOL, FederationPlan(partitioner="dirichlet", sites=6, alpha=0.3, seed=8), None)[1]

    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological", "linear", "exponential", "natural"])
def test_every_partitioner_covers_the_pool_exactly_once(kind: str) -> None:
    names, rows = partition_indices(POOL, FederationPlan(partitioner=kind, sites=4, seed=1, partition_by="cluster" if kind == "natural" else ""), None)
    flat = np.concatenate(rows)

    if kind not in ("natural", "pathological"):  # those two can leave samples out: counted below
        assert len(flat) == len(POOL)
    assert len(np.unique(flat)) == len(flat) and len(names) == 4


def test_samples_no_site_holds_are_counted() -> None:
    cfg = RunConfig(data="synthetic:600", partitioner="pathological", classes_per_site=2, sites=3)
    fed = build_federation(load_source(cfg.data, PREP), FederationPlan.from_config(cfg))

    held = sum(len(ds) for ds in fed.sites)
    assert fed.unassigned == 600 - held > 0 and fed.summary()["unassigned_samples"] == fed.unassigned


def test_dirichlet_skew_follows_alpha() -> None:
    # Small alpha concentrates each site on few classes; large alpha approaches IID (0.1).
    skew = {alpha: np.mean([_skew(alpha, s) for s in range(3)]) for alpha in (0.1, 1.0, 100.0)}

    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[0.1] > 0.5 and skew[100.0] < 0.16


def test_pathological_gives_each_site_its_classes_and_quantity_skew_grows() -> None:
    _, rows = partition_indices(POOL, FederationPlan(partitioner="pathological", sites=5, classes_per_site=2, seed=0), None)
    assert all(len(np.unique(POOL.label[r])) <= 2 for r in rows)
    _, rows = partition_indices(POOL, FederationPlan(partitioner="linear", sites=4, seed=0), None)
    sizes = [len(r) for r in rows]
    assert sizes == sorted(sizes) and sizes[-1] > 3 * sizes[0]


def test_natural_partition_of_avmnist_is_by_speaker() -> None:
    fed = build_federation(load_source("avmnist", PREP), FederationPlan(sites=6))

    assert fed.partitioner == "natural" and fed.names == ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
    assert all(set(ds.groups["speaker"]) == {name} for name, ds in zip(fed.names, fed.sites))
    with pytest.raises(ConfigError, match="only 6 natural sites"):
        build_federation(load_source("avmnist", PREP), FederationPlan(sites=7))


def test_missing_modalities_per_site_and_per_sample_keep_one_modality() -> None:
    site = POOL.subset(range(400))
    lost_all, note = degrade_site(site, FederationPlan(missing_modality_site_p=1.0), 0)
    assert lost_all.present.sum(axis=0).tolist().count(400) == 1 and len(note["modalities_lost"]) == 4

    sparse, note = degrade_site(site, FederationPlan(missing_modality_sample_p=0.5, seed=3), 1)
    assert sparse.present.any(axis=1).all()  # never a sample with nothing
    assert 0.4 < 1 - sparse.present.mean() < 0.5 and note["modality_cells_dropped"] > 0
    for j, name in enumerate(sparse.schema.names):
        absent = ~sparse.present[:, j]
        assert (sparse.features[name][absent] == 0).all()  # and the mask says so


def test_noisy_labels_follow_the_transition_matrix_and_missing_labels_are_counted() -> None:
    site = POOL.subset(range(2000))
    noisy, note = degrade_site(site, FederationPlan(label_noise=0.3, seed=2), 0)
    flipped = (noisy.label != site.label).mean()
    matrix = np.array(note["transition_matrix"])
    assert 0.27 < flipped < 0.33 and note["labels_flipped"] == int((noisy.label != site.label).sum())
    assert np.allclose(matrix.sum(axis=1), 1.0, atol=1e-3) and np.allclose(np.diag(matrix), 0.7)

    hidden, note = degrade_site(site, FederationPlan(missing_label_p=0.25, seed=2), 0)
    assert note["labels_hidden"] == int((hidden.label == UNLABELLED).sum()) == hidden.counts()["unlabelled"]
    assert len(hidden.labelled()) == len(site) - note["labels_hidden"]


def test_federation_summary_records_counts_per_class_and_modality() -> None:
    cfg = RunConfig(data="synthetic:600", partitioner="dirichlet", dirichlet_alpha=0.5, sites=3, missing_modality_site_p=0.5, seed=4)
    fed = build_federation(load_source(cfg.data, PREP), FederationPlan.from_config(cfg))
    summary = fed.summary()

    assert summary["synthetic"] is True and summary["plan"]["partitioner"] == "dirichlet" and summary["plan"]["seed"] == 4
    for name, ds in zip(fed.names, fed.sites):
        site = summary["sites"][name]
        assert sum(site["per_class"].values()) == site["samples"] == len(ds)
        assert set(site["per_modality"]) == set(ds.schema.names) and "modalities_lost" in site


def test_basicmotions_gives_two_sensor_modalities() -> None:
    source = load_source("basicmotions", PREP)

    assert [(m.name, m.shape) for m in source.schema.modalities] == [("accelerometer", (3, 100)), ("gyroscope", (3, 100))]
    assert len(source.pool) == 40 and len(source.test) == 40
    assert source.schema.classes == ("Standing", "Running", "Walking", "Badminton")


@pytest.mark.parametrize(
    ("settings", "key"),
    [({"class-weights": "balanced"}, "class-weights"), ({"balanced-sampler": True}, "balanced-sampler"),
     ({"partitioner": "dirchlet"}, "partitioner"), ({"label-noise": 1.5}, "label-noise"), ({"augment": "image:blur"}, "augment"),
     ({"image-mode": "CMYK"}, "image-mode"), ({"class-weights": "1,x"}, "class-weights")],
)
def test_settings_that_break_the_dp_claim_or_are_malformed_are_refused(settings: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        RunPlan.from_run_config(settings)


def test_imbalance_options_are_allowed_without_dp() -> None:
    cfg = RunConfig.from_run_config({"dp": False, "class-weights": "balanced", "balanced-sampler": True})
    assert cfg.balanced_sampler and cfg.fixed_class_weights() is None
    assert RunConfig(class_weights="1,2").fixed_class_weights() == (1.0, 2.0)


def test_weighted_loss_of_one_record_does_not_depend_on_its_batch() -> None:
    # nn.CrossEntropyLoss(weight=...) divides by the batch's sum of weights, so one record's
    # loss would depend on the others' labels; ours divides by the batch size.
    layout = OutputLayout((("label", 2, 1.0),), modalities=1)
    loss = Objective(layout, class_weights=torch.tensor([1.0, 3.0]), reduction="none")
    logits = torch.tensor([[0.2, 0.1], [0.3, -0.4], [1.0, 0.0]])
    present = torch.ones(3, 1)
    alone = loss(logits[:1], present[:1], torch.tensor([1]))
    together = loss(logits, present, torch.tensor([1, 0, 0]))

    assert torch.allclose(alone, together[:1])
    assert torch.allclose(alone, 3.0 * torch.nn.functional.cross_entropy(logits[:1], torch.tensor([1])))
    mean = Objective(layout, class_weights=torch.tensor([1.0, 3.0]))
    assert torch.allclose(mean(logits, present, torch.tensor([1, 0, 0])), together.mean())


def test_impossible_partitions_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="classes-per-site"):
        partition_indices(POOL.subset(range(100)), FederationPlan(partitioner="pathological", sites=3, classes_per_site=11), None)


def test_site_and_sample_losses_never_leave_a_sample_empty() -> None:
    site = POOL.subset(range(300))
    only_first = site.present.copy()
    only_first[:150, 1:] = False  # half the samples have only the image
    site = site.replace(present=only_first)

    degraded, note = degrade_site(site, FederationPlan(missing_modality_site_p=0.9, missing_modality_sample_p=0.6, seed=11), 2)

    assert degraded.present.any(axis=1).all()
