"""RunPlan: a run's parts built and checked together from one RunConfig, every auto resolved once."""

from __future__ import annotations

import pytest

from fedmm.config import RunConfig
from fedmm.data.schema import ModalityKind
from fedmm.data.synthetic import make_synthetic
from fedmm.errors import ConfigError
from fedmm.plan import RunPlan


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"model": "no-such-fusion"}, "model"),
        ({"audio-encoder": "lstm"}, "audio-encoder"),
        ({"image-mode": "CMYK"}, "image-mode"),
        ({"augment": "image:wobble"}, "augment"),
        ({"partitioner": "random"}, "partitioner"),
        ({"site-budgets": "george:-1"}, "site-budgets"),
        ({"model": "attention", "encoder-width": 30}, "encoder-width"),
        ({"contrastive": "clip"}, "contrastive"),  # in-batch negatives under DP
    ],
)
def test_the_plan_refuses_what_a_part_refuses_naming_the_key(settings: dict[str, object], key: str) -> None:
    cfg = RunConfig.from_run_config(settings)  # each value on its own is well-formed

    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        RunPlan.from_config(cfg)


def test_parts_come_from_the_one_config() -> None:
    plan = RunPlan.from_run_config({"augment": "image:shift", "site-budgets": "george:2", "client-dp": True, "image-size": 32})

    assert plan.preprocessing.image_size == 32
    assert plan.augment == {ModalityKind.IMAGE: ("shift",)}
    assert plan.site_budgets == {"george": 2.0, "*": 8.0}
    assert plan.client_dp is not None and plan.client_dp.clip_norm == plan.config.client_clip_norm


def test_resolved_config_replaces_every_auto_the_plan_decides() -> None:
    plan = RunPlan.from_run_config({"data": "synthetic:40"})
    schema = plan.model.prepare(make_synthetic(40)).schema

    resolved = plan.resolved(schema=schema, partitioner="iid")

    assert (resolved.model, resolved.image_encoder, resolved.partitioner) == ("concat", "cnn", "iid")
    assert resolved.learning_rate == plan.learning_rate(schema) == plan.model.learning_rate(schema)
    # The resolved config builds the same run again.
    again = RunPlan.from_config(resolved)
    assert again.model == plan.model and again.learning_rate(schema) == plan.learning_rate(schema)


def test_a_learning_rate_that_is_set_is_kept() -> None:
    plan = RunPlan.from_run_config({"learning-rate": 0.05})

    assert plan.learning_rate(plan.model.prepare(make_synthetic(10)).schema) == 0.05
