"""An independent check of DP-SGD's sensitivity: one extreme record moves a step by at most the clip.

For a batch D and its neighbour D' = D plus one *canary* record, one DP-SGD step without
noise (and with every record sampled) must differ by the canary's clipped gradient only:
``||sum(D') - sum(D)|| <= max_grad_norm``, whatever the canary holds, and every weight must
stay finite. Canaries set every model input to +-1e19 (its square overflows float32),
+-1e30 or +-3e38 (float32's largest values, which overflow the forward pass), or mark
every modality absent. Checked in every grad-sample mode fedmm offers, on a Linear-only
model (ghost clipping in one backward pass, ``fedmm.privacy.ghost``) and on a CNN encoder
(Opacus' two-pass ghost clipping): through :func:`fedmm.site.training.train`, as a site
trains, and for the per-record clipping itself (no input bound) through fedmm's
``PrivacyEngine`` directly.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedmm.config import AccountantKind, GradSampleMode
from fedmm.data.schema import MultimodalDataset
from fedmm.data.synthetic import make_synthetic
from fedmm.models import ModelOptions, ModelRecipe
from fedmm.privacy.accounting import SiteAccountant
from fedmm.privacy.ghost import OnePassGradSampleModule, PrivacyEngine
from fedmm.site.training import DPSettings, train

CLIP, LR, N = 1.0, 1000.0, 12  # a large lr keeps float32 round-off of "before - after" far below the 1e-4 slack
TOLERANCE = 1 + 1e-4
CANARIES = [1e19, -1e19, 1e30, -1e30, 3e38, -3e38, None]  # None: every modality absent
MODELS = {
    # the default model's encoders (scattering image features, pooled spectrogram, tabular): Linear only, one backward pass
    "linear": ModelRecipe("concat", ModelOptions(width=16, image_encoder="scattering", audio_encoder="pooled", modalities=("image", "audio", "tabular"))),
    # a CNN image encoder (Conv2d, GroupNorm): one backward pass too, its per-record gradients formed explicitly
    "cnn": ModelRecipe("concat", ModelOptions(width=16, image_encoder="cnn", modalities=("image", "tabular"))),
}
# (mode, model) as a site trains: ghost clipping (one backward pass for both models), per-sample gradients (hooks, functorch)
TRAINED = [(GradSampleMode.GHOST, "linear"), (GradSampleMode.GHOST, "cnn"), (GradSampleMode.HOOKS, "linear"), (GradSampleMode.FUNCTORCH, "linear")]
# (mode, model) whose clipping must hold without the input bound (not Opacus' two-pass ghost clipping: see below)
UNBOUNDED = [(GradSampleMode.GHOST, "linear"), (GradSampleMode.GHOST, "cnn"), (GradSampleMode.HOOKS, "linear"), (GradSampleMode.HOOKS, "cnn"), (GradSampleMode.FUNCTORCH, "linear"), (GradSampleMode.FUNCTORCH, "cnn")]


@pytest.fixture(scope="module")
def prepared() -> dict[str, MultimodalDataset]:
    data = make_synthetic(N, seed=5)
    return {name: recipe.prepare(data) for name, recipe in MODELS.items()}


def _with_canary(data: MultimodalDataset, value: float | None, *, present: bool = True) -> MultimodalDataset:
    """``data`` plus one record (label 0) whose every model input is ``value``; ``None``: zeros marked
    absent, as the loaders mark a missing modality (``present=False`` marks ``value`` absent)."""
    features = {
        name: np.concatenate([array, np.full((1, *array.shape[1:]), 0.0 if value is None else value, dtype=array.dtype)])
        for name, array in data.features.items()
    }
    mask = np.concatenate([data.present, np.full((1, data.present.shape[1]), present and value is not None)])
    ids = (*data.ids, "canary") if data.ids else ()
    groups = {k: np.concatenate([v, v[:1]]) for k, v in data.groups.items()}
    return data.replace(features=features, present=mask, label=np.concatenate([data.label, [0]]), groups=groups, ids=ids)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _trained_sum(recipe: ModelRecipe, data: MultimodalDataset, mode: GradSampleMode) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights after one noiseless DP-SGD step over all of ``data``, and the sum of clipped
    per-record gradients read back from them (Opacus divides it by the expected batch size,
    ``len(data)`` here)."""
    model = recipe.build(data.schema, seed=1)
    before = _flat(model)
    dp = DPSettings(noise_multiplier=0.0, max_grad_norm=CLIP, grad_sample_mode=mode, accountant=SiteAccountant(AccountantKind.RDP))
    # batch > len(data): one step per epoch, so the Poisson sample rate is 1 (every record, every time)
    loss = train(model, data, epochs=1, batch_size=N + 1, learning_rate=LR, momentum=0.0, seed=0, dp=dp, objective=recipe.objective(data.schema))
    assert dp.accountant.opacus.history == [(0.0, 1.0, 1)]  # (noise, sample rate, steps); fedmm's own view refuses noise 0
    after = _flat(model)
    assert np.isfinite(loss) and torch.isfinite(after).all()
    return after, (before - after) * len(data) / LR


@pytest.mark.parametrize(("mode", "model"), TRAINED, ids=[f"{m.value}-{k}" for m, k in TRAINED])
def test_one_canary_moves_a_training_step_by_at_most_the_clip(mode: GradSampleMode, model: str, prepared: dict[str, MultimodalDataset]) -> None:
    recipe, data = MODELS[model], prepared[model]
    weights, summed = _trained_sum(recipe, data, mode)
    for value in CANARIES:
        neighbour_weights, neighbour_summed = _trained_sum(recipe, _with_canary(data, value), mode)
        moved = float((neighbour_summed - summed).norm())  # the canary's clipped gradient, nothing else
        assert moved <= CLIP * TOLERANCE, (value, moved)
        assert float((neighbour_weights - weights).norm()) / LR <= CLIP * TOLERANCE, value  # the applied mean moves less


def _direct_step(recipe: ModelRecipe, data: MultimodalDataset, mode: GradSampleMode) -> tuple[torch.Tensor, int, torch.nn.Module]:
    """One noiseless step of fedmm's PrivacyEngine on ``data`` as one batch, inputs as they are (no
    bound): the new weights (float64), the records counted as non-finite, and the wrapped module.
    The expected batch size is ``N`` for every batch, so the update is ``lr / N`` x the clipped sum."""
    model = recipe.build(data.schema, seed=1)
    objective = recipe.objective(data.schema)
    wrapped = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), criterion=objective,
        data_loader=DataLoader(TensorDataset(torch.zeros(N, 1)), batch_size=N), noise_multiplier=0.0, max_grad_norm=CLIP,
        grad_sample_mode=mode.value, poisson_sampling=False,
    )
    module, optimizer, criterion = (wrapped[0], wrapped[1], wrapped[2]) if mode is GradSampleMode.GHOST else (wrapped[0], wrapped[1], objective)
    assert optimizer.expected_batch_size == N
    inputs = [torch.from_numpy(np.array(data.features[name])) for name in data.schema.names]
    present = torch.from_numpy(data.present.astype(np.float32))
    module.train()
    optimizer.zero_grad()
    loss = criterion(module(*inputs, present), present, torch.from_numpy(data.label))
    loss.backward()
    optimizer.step()
    module._close()
    return _flat(model), int(getattr(optimizer, "nonfinite_records", -1)), module


@pytest.mark.parametrize(("mode", "model"), UNBOUNDED, ids=[f"{m.value}-{k}" for m, k in UNBOUNDED])
def test_per_record_clipping_itself_bounds_any_canary(mode: GradSampleMode, model: str, prepared: dict[str, MultimodalDataset]) -> None:
    # No input bound here: the clipping must hold on its own. (Opacus' two-pass ghost clipping
    # cannot take a record whose forward pass overflows; fedmm bounds every input instead, above.)
    recipe, data = MODELS[model], prepared[model]
    base, counted, module = _direct_step(recipe, data, mode)
    assert counted == 0 and torch.isfinite(base).all()
    assert (type(module) is OnePassGradSampleModule) == (mode is GradSampleMode.GHOST)
    zeroed = 0
    neighbours = [_with_canary(data, value) for value in CANARIES] + [_with_canary(data, 3e38, present=False)]
    for neighbour in neighbours:
        after, counted, _ = _direct_step(recipe, neighbour, mode)
        value = neighbour.features["tabular"][-1, 0]
        assert torch.isfinite(after).all(), value
        assert counted in (0, 1), value
        zeroed += counted
        moved = float((after - base).norm()) * N / LR
        assert moved <= CLIP * TOLERANCE, (value, moved)
    if model == "linear" or mode is GradSampleMode.GHOST:
        assert zeroed > 0  # some canary overflowed the forward pass: left out, and counted


class _Exploding(torch.nn.Module):
    """exp of the tabular input: a record with a tabular value of 100 overflows float32 (inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(8, 10)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.head(torch.exp(inputs[-2]))


@pytest.mark.parametrize("mode", [GradSampleMode.GHOST, GradSampleMode.HOOKS])
def test_a_record_whose_gradient_is_not_finite_is_left_out_and_logged_at_the_site(
    mode: GradSampleMode, prepared: dict[str, MultimodalDataset], caplog: pytest.LogCaptureFixture,
) -> None:
    data = prepared["linear"]
    objective = MODELS["linear"].objective(data.schema)
    sums = []
    for ds in (data, _with_canary(data, 100.0)):
        torch.manual_seed(0)
        model = _Exploding()
        before = _flat(model)
        dp = DPSettings(noise_multiplier=0.0, max_grad_norm=CLIP, grad_sample_mode=mode, accountant=SiteAccountant(AccountantKind.RDP))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedmm.site.training"):
            train(model, ds, epochs=1, batch_size=N + 1, learning_rate=LR, momentum=0.0, seed=0, dp=dp, objective=objective)
        assert torch.isfinite(_flat(model)).all()
        sums.append((before - _flat(model)) * len(ds) / LR)
    assert "1 record" in caplog.text and "not finite" in caplog.text  # the canary's run, at the site only
    assert float((sums[1] - sums[0]).norm()) <= 1e-4  # it contributed nothing
