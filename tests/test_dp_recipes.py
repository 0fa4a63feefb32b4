"""DP-SGD recipes (docs/training.md): physical batches, augmentation multiplicity, and their config keys.

- ``max-physical-batch-size``: Opacus' ``BatchMemoryManager`` splits each Poisson batch; with the
  same sampled records and noise (the OS randomness fixed here) the steps, the accountant's
  history and the trained weights are those of one pass per batch.
- ``augment-multiplicity``: K augmented copies of a record are averaged before clipping, so one
  record still moves the summed gradient by at most ``max-grad-norm`` and the accountant sees
  the same (noise, sample rate, steps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmm.config import AccountantKind, GradSampleMode, RunConfig
from fedmm.data.augment import Augmenter, parse_augment
from fedmm.data.schema import MultimodalDataset
from fedmm.data.synthetic import make_synthetic
from fedmm.errors import ConfigError
from fedmm.models import ModelOptions, ModelRecipe
from fedmm.privacy import noise
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ghost import GradSampleClippingOptimizer
from fedmm.site import training
from fedmm.site.training import DPSettings, average_copies, repeat_records, train

MODELS = {
    "linear": ModelRecipe("concat", ModelOptions(width=16, image_encoder="scattering", audio_encoder="pooled", modalities=("image", "audio", "tabular"))),
    "cnn": ModelRecipe("concat", ModelOptions(width=8, image_encoder="cnn", modalities=("image", "tabular"))),
}
CLIP = 1.0


@pytest.fixture(scope="module")
def prepared() -> dict[str, MultimodalDataset]:
    data = make_synthetic(40, seed=3)
    return {name: recipe.prepare(data) for name, recipe in MODELS.items()}


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _fixed_os_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sampled records and the noise come from os.urandom; fixed here so two runs draw the same ones.
    monkeypatch.setattr(training.os, "urandom", lambda n: bytes(range(n)))


def _run(recipe: ModelRecipe, data: MultimodalDataset, mode: GradSampleMode, **kwargs: object) -> tuple[torch.Tensor, list[tuple[float, float, int]]]:
    noise._streams.__dict__.pop("pid", None)  # the noise stream is keyed again (from the fixed os.urandom): each run draws the same noise
    model = recipe.build(data.schema, seed=1)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=CLIP, grad_sample_mode=mode, accountant=SiteAccountant(AccountantKind.RDP))
    loss = train(model, data, epochs=1, batch_size=16, learning_rate=0.1, momentum=0.0, seed=0, dp=dp, objective=recipe.objective(data.schema), **kwargs)
    assert np.isfinite(loss)
    return _flat(model), list(dp.accountant.opacus.history)


CASES = [(GradSampleMode.GHOST, "linear"), (GradSampleMode.GHOST, "cnn"), (GradSampleMode.HOOKS, "linear")]


@pytest.mark.parametrize(("mode", "model"), CASES, ids=[f"{m.value}-{k}" for m, k in CASES])
def test_physical_batches_give_the_same_steps_accounting_and_weights(
    mode: GradSampleMode, model: str, prepared: dict[str, MultimodalDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    _fixed_os_randomness(monkeypatch)
    whole, history = _run(MODELS[model], prepared[model], mode)
    split, split_history = _run(MODELS[model], prepared[model], mode, max_physical_batch_size=3)
    assert split_history == history == [(1.0, 1 / 3, 3)]  # (noise, sample rate, steps): the same steps
    assert torch.allclose(split, whole, atol=1e-5), float((split - whole).abs().max())


def test_physical_batches_without_dp_accumulate_to_the_same_step(prepared: dict[str, MultimodalDataset]) -> None:
    recipe, data = MODELS["linear"], prepared["linear"]
    out = []
    for chunk in (0, 5):
        model = recipe.build(data.schema, seed=1)
        train(model, data, epochs=1, batch_size=16, learning_rate=0.1, momentum=0.0, seed=0, dp=None, objective=recipe.objective(data.schema), max_physical_batch_size=chunk)
        out.append(_flat(model))
    assert torch.allclose(out[0], out[1], atol=1e-6)


def test_average_copies_takes_each_records_mean() -> None:
    layer = torch.nn.Linear(2, 1)
    layer.weight.grad_sample = torch.arange(12.0).view(6, 1, 2)  # 3 records x 2 copies
    average_copies(layer, 2)
    assert layer.weight.grad_sample.tolist() == [[[1.0, 2.0]], [[5.0, 6.0]], [[9.0, 10.0]]]
    assert [t.tolist() for t in repeat_records([torch.tensor([[1], [2]])], 3)] == [[[1], [1], [1], [2], [2], [2]]]


@pytest.mark.parametrize("mode", [GradSampleMode.HOOKS, GradSampleMode.FUNCTORCH])
def test_multiplicity_keeps_one_records_contribution_within_the_clip(mode: GradSampleMode, prepared: dict[str, MultimodalDataset], monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, data = MODELS["cnn"], prepared["cnn"]
    seen: list[tuple[int, int]] = []
    original = GradSampleClippingOptimizer.clip_and_accumulate

    def spy(self: GradSampleClippingOptimizer) -> None:
        seen.append((len(self.grad_samples[0]), self.expected_batch_size))
        original(self)

    monkeypatch.setattr(GradSampleClippingOptimizer, "clip_and_accumulate", spy)
    lr, k = 1000.0, 4
    augmenter = Augmenter(data.schema, parse_augment("image:shift+rotate,tabular:noise"), seed=0)
    for i in range(3):
        # One record, scaled up so that its mean gradient over the copies is far above the clip;
        # batch 2 > 1 record: the sample rate is 1, one step, expected batch 1 (the noise's divisor).
        one = data.subset(np.array([i]))
        one = one.replace(features={name: a * 50 for name, a in one.features.items()})
        model = recipe.build(one.schema, seed=1)
        before = _flat(model)
        dp = DPSettings(noise_multiplier=0.0, max_grad_norm=CLIP, grad_sample_mode=mode, accountant=SiteAccountant(AccountantKind.RDP))
        train(model, one, epochs=1, batch_size=2, learning_rate=lr, momentum=0.0, seed=i, dp=dp, objective=recipe.objective(one.schema), augmenter=augmenter, augment_multiplicity=k)
        moved = float((before - _flat(model)).norm()) / lr  # the record's whole contribution to the summed gradient
        assert moved <= CLIP * (1 + 1e-4), moved
        assert moved >= CLIP * 0.99, moved  # clipped once, after the mean: neither K clips summed nor divided by K
        assert dp.accountant.opacus.history == [(0.0, 1.0, 1)]
    assert seen == [(1, 1)] * 3  # the optimizer clips 1 row (the record), not K copies, and divides by 1 record


def test_multiplicity_leaves_the_accounting_unchanged(prepared: dict[str, MultimodalDataset]) -> None:
    recipe, data = MODELS["cnn"], prepared["cnn"]
    augmenter = Augmenter(data.schema, parse_augment("image:shift"), seed=0)
    histories = [_run(recipe, data, GradSampleMode.HOOKS, augmenter=augmenter, augment_multiplicity=k)[1] for k in (1, 3)]
    assert histories[0] == histories[1] == [(1.0, 1 / 3, 3)]
    with pytest.raises(ValueError, match="hooks or functorch"):
        _run(recipe, data, GradSampleMode.GHOST, augmenter=augmenter, augment_multiplicity=2)


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"max-physical-batch-size": -1}, "'max-physical-batch-size': must be in [0, 1000000] (got -1)"),
        ({"augment-multiplicity": 0}, "'augment-multiplicity': must be in [1, 64] (got 0)"),
        ({"augment-multiplicity": 65}, "'augment-multiplicity': must be in [1, 64] (got 65)"),
        ({"augment-multiplicity": 4}, "augment is not set"),
        ({"augment-multiplicity": 4, "augment": "image:shift"}, "Fix: add grad-sample-mode='hooks'"),
        ({"augment-multiplicity": 2.5}, "must be an integer"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(values: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match="Fix") as err:
        RunConfig.from_run_config(values)
    assert words in str(err.value)


def test_good_values_parse() -> None:
    cfg = RunConfig.from_run_config({"max-physical-batch-size": 64, "batch-size": 256, "augment-multiplicity": 4, "augment": "image:shift", "grad-sample-mode": "hooks"})
    assert (cfg.max_physical_batch_size, cfg.augment_multiplicity) == (64, 4)
    assert RunConfig.from_run_config({"augment-multiplicity": 4, "augment": "image:shift", "dp": False}).augment_multiplicity == 4

