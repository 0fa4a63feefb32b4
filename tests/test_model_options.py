"""Model options at the edges: config checks, pretrained image weights, tasks, modality
dropout, exact missing-modality sites, and why CLIP's loss is refused under DP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmm.config import RunConfig
from fedmm.data.avmnist import builtin_root, load_site
from fedmm.data.partition import FederationPlan, build_federation
from fedmm.data.preprocess import Preprocessing
from fedmm.data.sources import load_source
from fedmm.data.synthetic import make_synthetic
from fedmm.errors import ConfigError
from fedmm.plan import RunPlan
from fedmm.models import ModelOptions, ModelRecipe, OutputLayout, Objective, save_image_encoder
from fedmm.models.encoders import ConvImageEncoder
from fedmm.privacy.accounting import SiteAccountant
from fedmm.site import SiteState, train_round
from fedmm.site.training import drop_modalities


def _weights(path: Path, seed: int) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        save_image_encoder(ConvImageEncoder(channels=1, out_features=16), path)
    return path


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"image-encoder": "pretrained"}, "image-weights"),
        ({"contrastive": "clip"}, "contrastive"),
        ({"text-encoder": "lstm"}, "text-encoder"),
        ({"encoder-width": 2}, "encoder-width"),
        ({"modality-dropout": 1.0}, "modality-dropout"),
        ({"tasks": "speaker:x"}, "tasks"),
        ({"tasks": "speaker:-1"}, "tasks"),
        ({"missing-modality-sites": "audio"}, "missing-modality-sites"),
        ({"missing-modality-sites": "audio:1.5"}, "missing-modality-sites"),
        ({"tasks": "speaker,speaker"}, "tasks"),
        ({"tasks": "label"}, "tasks"),
        ({"model": "attention", "encoder-width": 30}, "encoder-width"),
    ],
)
def test_bad_model_settings_are_config_errors(settings: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        RunPlan.from_run_config(settings)  # every part of the run, as the server and each site build it
    assert error.value.key == key


def test_the_earlier_default_name_still_builds_the_same_model() -> None:
    old = ModelRecipe.from_config(RunConfig(model="avmnist-concat"))
    assert old == ModelRecipe.from_config(RunConfig())


def test_dp_noise_and_sampling_do_not_follow_the_public_seed() -> None:
    # With the seed known to the server, seeded noise could be regenerated and subtracted.
    from fedmm.config import AccountantKind, GradSampleMode
    from fedmm.site.training import DPSettings, train

    recipe = ModelRecipe()
    data = recipe.prepare(make_synthetic(32, seed=0))

    def weights(dp: bool) -> torch.Tensor:
        model = recipe.build(data.schema, seed=0)
        settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=GradSampleMode.GHOST, accountant=SiteAccountant(AccountantKind.RDP)) if dp else None
        train(model, data, epochs=1, batch_size=8, learning_rate=0.1, momentum=0.0, seed=5, dp=settings)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(False), weights(False))  # plain training follows the seed
    assert not torch.equal(weights(True), weights(True))  # DP draws do not


def test_clip_is_refused_under_dp_for_a_reason_a_test_can_see() -> None:
    # CLIP's in-batch negatives: one record's loss changes with the other records of
    # its batch, so per-record clipping would not bound its influence.
    layout = OutputLayout((("label", 2, 1.0),), modalities=2, projection=4)
    out = torch.randn(5, 2 + 2 * 4, generator=torch.Generator().manual_seed(0))
    present, label = torch.ones(5, 2), torch.zeros(5, dtype=torch.long)
    for kind in ("clip", "align"):
        loss = Objective(layout, contrastive=kind, contrastive_weight=1.0, reduction="none")
        alone = loss(out[:2], present[:2], label[:2])[0]
        together = loss(out, present, label)[0]
        assert torch.isclose(alone, together) == (kind == "align"), kind
    assert RunConfig.from_run_config({"contrastive": "clip", "dp": False}).contrastive == "clip"


def test_auxiliary_labels_that_are_unknown_add_nothing() -> None:
    layout = OutputLayout((("label", 2, 1.0), ("speaker", 3, 0.5)), modalities=1)
    loss = Objective(layout, reduction="none")
    out = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    main = torch.nn.functional.cross_entropy(out[:, :2], torch.tensor([0, 1]), reduction="none")
    got = loss(out, torch.ones(2, 1), torch.tensor([0, 1]), torch.tensor([-1, 2]))
    speaker = torch.nn.functional.cross_entropy(out[1:, 2:], torch.tensor([2]))
    assert torch.allclose(got, main + torch.tensor([0.0, 0.5 * float(speaker)]))


def test_pretrained_image_features_name_their_weights(tmp_path: Path) -> None:
    ds = make_synthetic(12, seed=0)
    ds = ds.replace(present=ds.present & (np.arange(12) % 4 != 0)[:, None])
    a, b = _weights(tmp_path / "a.pt", 1), _weights(tmp_path / "b.pt", 2)
    one = ModelRecipe("embedding", ModelOptions(image_encoder="pretrained", image_weights=str(a), modalities=("image", "audio"))).prepare(ds)
    other = ModelRecipe("embedding", ModelOptions(image_encoder="pretrained", image_weights=str(b), modalities=("image", "audio"))).prepare(ds)

    m = one.schema.modality("image")
    assert m.shape == (16,) and m.representation.startswith("pretrained:")
    assert one.schema.to_json() != other.schema.to_json()  # a site with other weights is refused by the schema check
    assert (one.features["image"][::4] == 0).all() and (one.features["image"][1::4] != 0).any()  # absent stays zeros


def test_unreadable_or_foreign_image_weights_say_so_and_nothing_of_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The path comes from the run config (at a deployed site: from the server), and the error reaches the server:
    # the same message for a missing, a foreign or a text file, none of its bytes; the cause in the local log.
    ds = make_synthetic(4, seed=0)
    foreign = tmp_path / "foreign.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("secret: hunter2")
    messages = set()
    for path in (tmp_path / "missing.pt", foreign, text):
        with pytest.raises(ConfigError, match="no readable state_dict of fedmm's ConvImageEncoder") as error:
            ModelRecipe("concat", ModelOptions(image_encoder="pretrained", image_weights=str(path))).prepare(ds)
        assert error.value.key == "image-weights" and "hunter2" not in str(error.value) and "'s'" not in str(error.value)
        messages.add(str(error.value).replace(str(path), "PATH"))
    assert len(messages) == 1
    assert "FileNotFoundError" in caplog.text


def test_embedding_fusion_needs_pretrained_features() -> None:
    with pytest.raises(ConfigError, match="text-features='minilm'"):
        ModelRecipe("embedding").prepare(make_synthetic(4))


def test_choosing_modalities_and_the_auto_learning_rate() -> None:
    site = load_site(builtin_root(), "george")
    image_only = ModelRecipe.from_config(RunConfig(modalities="image"))
    data = image_only.prepare(site)

    assert data.schema.names == ("image",) and data.schema.modality("image").representation == "scattering"
    assert image_only.learning_rate(data.schema) == 0.5  # linear encoders over fixed features
    assert ModelRecipe().learning_rate(ModelRecipe().prepare(make_synthetic(4)).schema) == 0.2  # a CNN
    with pytest.raises(ConfigError, match="video"):
        ModelRecipe.from_config(RunConfig(modalities="video")).prepare(site)


def test_modality_dropout_hides_modalities_but_never_all() -> None:
    g = torch.Generator().manual_seed(0)
    image, audio = torch.ones(2000, 1, 2, 2), torch.ones(2000, 3)
    present = torch.ones(2000, 2)
    present[:500, 1] = 0.0
    audio[:500] = 0.0

    out_image, out_audio, kept = drop_modalities([image, audio, present], 0.3, g)

    assert (kept.sum(dim=1) >= 1).all() and (kept <= present).all()
    assert torch.equal(out_image.flatten(1).amax(dim=1), kept[:, 0]) and torch.equal(out_audio.amax(dim=1), kept[:, 1])
    both = kept[500:].sum(dim=1)
    assert abs(float((both == 2).float().mean()) - 0.7**2) < 0.05  # each hidden with p=0.3 (one of two rescued)


def test_exactly_half_the_sites_lose_audio() -> None:
    cfg = RunConfig(missing_modality_sites="audio:0.5")
    source = load_source("avmnist", Preprocessing.from_config(cfg))
    federation = build_federation(source, FederationPlan.from_config(cfg))

    without = [n for n, s in zip(federation.names, federation.sites) if s.present[:, 1].sum() == 0]
    assert len(without) == 3 and all(s.present[:, 0].all() for s in federation.sites)
    assert all((s.features["audio"][~s.present[:, 1]] == 0).all() for s in federation.sites)
    summary = federation.summary()
    assert sorted(n for n, note in summary["sites"].items() if "audio" in note.get("modalities_lost", [])) == sorted(without)  # type: ignore[attr-defined]
    assert len(FederationPlan(sites=5, missing_modality_sites="audio:0.5").sites_losing()["audio"]) == 3  # half rounds up
    with pytest.raises(ConfigError, match="every modality"):
        build_federation(source, FederationPlan.from_config(RunConfig(missing_modality_sites="audio:1,image:1")))


def test_a_site_adopts_the_servers_task_classes() -> None:
    # One speaker per site: its own data would give a one-class speaker head. The server
    # names all six, so every site builds the same heads, and the update's layout matches.
    cfg = RunConfig(tasks="speaker:0.5", rounds=1, batch_size=64)
    recipe = ModelRecipe.from_config(cfg)
    site = load_site(builtin_root(), "george")
    test = load_source("avmnist", Preprocessing.from_config(cfg)).require_test()
    server = recipe.prepare(test, tasks_from=recipe.task_classes(test)).schema
    assert server.tasks[0][0] == "speaker" and len(server.tasks[0][1]) == 6
    model = recipe.build(server)

    update = train_round(
        cfg=cfg, site="george", data=site, global_weights=model.state_dict(), server_round=1,
        state=SiteState(plan=None, accountant=SiteAccountant(cfg.accountant)), expected_schema=server.to_json(),
    )

    assert {k: v.shape for k, v in update.state_dict.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert update.state_dict["head.weight"].shape[0] == 10 + 6
    blank = site.replace(groups={**site.groups, "speaker": np.array([""] * len(site))})
    assert recipe.task_classes(blank, test) == recipe.task_classes(test)  # an empty cell is unknown, not a class
    with pytest.raises(ConfigError, match="no column 'accent'"):
        ModelRecipe.from_config(RunConfig(tasks="accent")).prepare(site)
    card = recipe.card(model, server)
    assert json.loads(json.dumps(card))["tasks"] == [
        {"name": "label", "classes": 10, "loss_weight": 1.0}, {"name": "speaker", "classes": 6, "loss_weight": 0.5},
    ]
